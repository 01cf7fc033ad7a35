//! The registry: Rust operators by the name a configuration's `[[operators]]` gives them.
//!
//! ```text
//! [[operators]] name = "x", settings = {..} ──► Registry: "x" ─► constructor(settings as S) ─► operator
//! [[operators]] name = "y", query = "..."   ──► SqlOperator::from_config (no registration)
//! [[operators]] name = "z", webhook = {..}  ──► operators::Webhook::from_config (no registration)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::{AnyOperator, Operator, SqlOperator};
use crate::config::OperatorConfig;

/// Builds an operator from its `[[operators]]` entry's `settings`.
type Constructor = Arc<dyn Fn(&toml::Table) -> anyhow::Result<AnyOperator> + Send + Sync>;

/// An operator that could not be built from the configuration. Names the operator's entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No Rust operator is registered under the name.
    #[error(
        "operators.{name}: no operator is registered under this name: registered Rust operators \
         are {known}; a declarative operator needs `query` and `id`, a webhook `webhook = \
         {{ url = \"...\", entities = [...] }}`"
    )]
    Unknown {
        /// The name in the configuration.
        name: String,
        /// The registered names.
        known: String,
    },
    /// The operator's `settings` do not fit what its constructor takes.
    #[error(
        "operators.{name}.settings{}: {message}",
        key.as_ref().map(|key| format!(".{key}")).unwrap_or_default()
    )]
    Settings {
        /// The operator.
        name: String,
        /// The setting at fault (`uppercase`, `limits.max`), when it is one setting.
        key: Option<String>,
        /// What is wrong with it.
        message: String,
    },
    /// The constructor failed.
    #[error("operators.{name}: {message}")]
    Build {
        /// The operator.
        name: String,
        /// Why it could not be built.
        message: String,
    },
    /// Two operators were registered under one name ([`Registry::register`],
    /// [`Registry::register_with`] or [`Registry::merge`]): one would silently stand in for
    /// the other.
    #[error(
        "operator {name:?} is registered twice (Registry::register, register_with or merge), so \
         one would silently replace the other: to put an operator of yours in place of another \
         of that name, remove that one first with Registry::without({name:?})"
    )]
    Duplicate {
        /// The name registered more than once.
        name: String,
    },
    /// The operator calls itself something else than the name it is registered under.
    #[error(
        "operators.{name}: the operator registered as {name:?} calls itself {actual:?} \
         (Operator::name); make them the same: the name is also its checkpoint's key"
    )]
    NameMismatch {
        /// The registered name.
        name: String,
        /// What its `Operator::name` says.
        actual: String,
    },
}

/// Rust operators by name, so that a configuration can name them.
///
/// A name is registered once: registering it again, or merging two registries that both
/// have it, makes [`build`](Self::build) refuse the registry naming the operator (the name
/// is also the key of the operator's checkpoint, so a silent replacement would hand one
/// operator's progress to another). To run your own operator under a name another registry
/// already uses, say so with [`without`](Self::without):
/// `streamex::operators::registry().without("post_comment_tallies").register(..)`.
///
/// ```
/// use serde::Deserialize;
/// use streamex::event::Event;
/// use streamex::operator::{Context, Operator, Registry, Subscription};
///
/// struct Greeter { greeting: String }
///
/// impl Operator for Greeter {
///     fn name(&self) -> &str { "greeter" }
///     fn subscriptions(&self) -> Vec<Subscription> { vec![Subscription::all("posts")] }
///     async fn handle(&self, _event: &Event, _ctx: &mut Context<'_>) -> anyhow::Result<()> {
///         tracing::info!(greeting = %self.greeting, "a post changed");
///         Ok(())
///     }
/// }
///
/// /// `[[operators]] name = "greeter"` with `settings = { greeting = "hi" }`.
/// #[derive(Deserialize)]
/// struct GreeterSettings { greeting: String }
///
/// let registry = Registry::new().register_with("greeter", |s: GreeterSettings| {
///     Ok(Greeter { greeting: s.greeting })
/// });
/// assert_eq!(registry.names().collect::<Vec<_>>(), ["greeter"]);
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    constructors: BTreeMap<String, Constructor>,
    /// Names registered more than once: `build` refuses the registry while there are any.
    duplicates: BTreeSet<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.constructors.keys()).finish()
    }
}

impl Registry {
    /// An empty registry: only declarative operators can be configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an operator without settings under `name`, which must be its
    /// [`Operator::name`]; `build` makes it. A name already registered makes
    /// [`build`](Self::build) fail ([`RegistryError::Duplicate`]).
    pub fn register<O: Operator>(
        self,
        name: &str,
        build: impl Fn() -> O + Send + Sync + 'static,
    ) -> Self {
        self.register_with(name, move |_: serde::de::IgnoredAny| Ok(build()))
    }

    /// Registers an operator under `name` (which must be its [`Operator::name`]), made by
    /// `build` from its entry's `settings` table read as `S` (a type deriving
    /// `serde::Deserialize`); a setting that does not fit is refused naming
    /// `operators.NAME.settings.KEY`. A name already registered makes
    /// [`build`](Self::build) fail ([`RegistryError::Duplicate`]).
    pub fn register_with<S, O>(
        mut self,
        name: &str,
        build: impl Fn(S) -> anyhow::Result<O> + Send + Sync + 'static,
    ) -> Self
    where
        S: DeserializeOwned,
        O: Operator,
    {
        let owned = name.to_owned();
        let constructor: Constructor = Arc::new(move |settings: &toml::Table| {
            let settings: S =
                serde_path_to_error::deserialize(toml::Value::Table(settings.clone())).map_err(
                    |e: serde_path_to_error::Error<toml::de::Error>| RegistryError::Settings {
                        name: owned.clone(),
                        // "." is the table as a whole (a missing field names itself in the
                        // message).
                        key: Some(e.path().to_string()).filter(|path| path != "."),
                        message: e.inner().message().to_owned(),
                    },
                )?;
            let operator = build(settings).map_err(|e| RegistryError::Build {
                name: owned.clone(),
                message: crate::error::chain(&e),
            })?;
            if operator.name() != owned {
                return Err(RegistryError::NameMismatch {
                    name: owned.clone(),
                    actual: operator.name().to_owned(),
                }
                .into());
            }
            Ok(AnyOperator::new(operator))
        });
        if self
            .constructors
            .insert(name.to_owned(), constructor)
            .is_some()
        {
            self.duplicates.insert(name.to_owned());
        }
        self
    }

    /// Takes in every operator `other` registers. A name both registries have makes
    /// [`build`](Self::build) fail ([`RegistryError::Duplicate`]): to replace one of this
    /// registry's operators with one of `other`'s, remove it first with
    /// [`without`](Self::without).
    pub fn merge(mut self, other: Registry) -> Self {
        self.duplicates.extend(other.duplicates);
        for (name, constructor) in other.constructors {
            if self
                .constructors
                .insert(name.clone(), constructor)
                .is_some()
            {
                self.duplicates.insert(name);
            }
        }
        self
    }

    /// This registry without the operator registered under `name` (if any): the explicit
    /// way to register an operator of your own under a name another registry uses.
    ///
    /// ```
    /// # use streamex::operators::PostCommentTallies as MyTallies;
    /// use streamex::operator::Registry;
    ///
    /// let registry = streamex::operators::registry()
    ///     .without("post_comment_tallies")
    ///     .register("post_comment_tallies", || MyTallies);
    /// assert!(registry.build(&[]).is_ok());
    /// ```
    pub fn without(mut self, name: &str) -> Self {
        self.constructors.remove(name);
        self.duplicates.remove(name);
        self
    }

    /// The registered names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.constructors.keys().map(String::as_str)
    }

    /// The operators `configs` name: declarative ones (with `query`) and webhooks (with
    /// `webhook`) from their entry, Rust ones from this registry with their settings.
    ///
    /// Fails on the first entry that cannot be built, naming it, and on a registry with a name
    /// registered twice ([`RegistryError::Duplicate`]) whatever `configs` name.
    pub fn build(&self, configs: &[OperatorConfig]) -> Result<Vec<AnyOperator>, RegistryError> {
        if let Some(name) = self.duplicates.first() {
            return Err(RegistryError::Duplicate { name: name.clone() });
        }
        configs
            .iter()
            .map(|config| {
                if let Some(webhook) = &config.webhook {
                    return crate::operators::Webhook::from_config(&config.name, webhook)
                        .map(AnyOperator::new)
                        .map_err(|e| RegistryError::Build {
                            name: config.name.clone(),
                            message: crate::error::Chain(&e).to_string(),
                        });
                }
                if config.query.is_some() {
                    return SqlOperator::from_config(config)
                        .map(AnyOperator::new)
                        .map_err(|e| RegistryError::Build {
                            name: config.name.clone(),
                            message: crate::error::chain(&e),
                        });
                }
                let constructor =
                    self.constructors
                        .get(&config.name)
                        .ok_or_else(|| RegistryError::Unknown {
                            name: config.name.clone(),
                            known: if self.constructors.is_empty() {
                                "none".to_owned()
                            } else {
                                self.names().collect::<Vec<_>>().join(", ")
                            },
                        })?;
                constructor(&config.settings).map_err(|e| match e.downcast::<RegistryError>() {
                    Ok(e) => e,
                    Err(e) => RegistryError::Build {
                        name: config.name.clone(),
                        message: crate::error::chain(&e),
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::Event;
    use crate::operator::{Context, Subscription};

    struct Named(&'static str);

    impl Operator for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            vec![Subscription::all("posts")]
        }
        async fn handle(&self, _: &Event, _: &mut Context<'_>) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn configs(toml: &str) -> Vec<OperatorConfig> {
        Config::parse(
            &format!("database_url = \"postgres://localhost/db\"\n{toml}"),
            "test",
            [],
        )
        .expect("a valid configuration")
        .operators
    }

    #[test]
    fn a_name_registered_twice_is_refused_naming_it() {
        let twice = Registry::new()
            .register("post_titles", || Named("post_titles"))
            .register("post_titles", || Named("post_titles"));
        let error = twice.build(&[]).unwrap_err();
        assert!(
            matches!(&error, RegistryError::Duplicate { name } if name == "post_titles"),
            "{error}"
        );
        assert!(error.to_string().contains("Registry::without"), "{error}");
    }

    #[test]
    fn merging_two_registries_with_one_name_is_refused_whatever_the_configuration_names() {
        let mine =
            Registry::new().register("post_comment_tallies", || Named("post_comment_tallies"));
        let merged = crate::operators::registry().merge(mine);
        // Even a configuration naming only another operator: the registry itself is wrong.
        let error = merged
            .build(&configs("[[operators]]\nname = \"count_events\""))
            .unwrap_err();
        assert!(
            matches!(&error, RegistryError::Duplicate { name } if name == "post_comment_tallies"),
            "{error}"
        );
    }

    #[test]
    fn without_lets_an_operator_of_ones_own_take_a_name() {
        struct Mine;
        impl Operator for Mine {
            fn name(&self) -> &str {
                "post_comment_tallies"
            }
            fn subscriptions(&self) -> Vec<Subscription> {
                vec![Subscription::all("mine")]
            }
            async fn handle(&self, _: &Event, _: &mut Context<'_>) -> anyhow::Result<()> {
                Ok(())
            }
        }
        let registry = crate::operators::registry()
            .without("post_comment_tallies")
            .merge(Registry::new().register("post_comment_tallies", || Mine));
        let built = registry
            .build(&configs("[[operators]]\nname = \"post_comment_tallies\""))
            .unwrap();
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].subscriptions(), [Subscription::all("mine")]);
        assert_eq!(
            registry.names().collect::<Vec<_>>(),
            ["count_events", "post_comment_tallies"]
        );
    }

    #[test]
    fn a_webhook_entry_is_built_without_registration() {
        let built = Registry::new()
            .build(&configs(
                "[[operators]]\nname = \"notify\"\nwebhook = { url = \"https://example.com/hooks\", \
                 entities = [\"comments\", \"posts\"], types = [\"insert\", \"delete\"] }",
            ))
            .unwrap();
        assert_eq!(built[0].name(), "notify");
        let types = [
            crate::event::EventType::Insert,
            crate::event::EventType::Delete,
        ];
        assert_eq!(
            built[0].subscriptions(),
            [
                Subscription::only("comments", &types),
                Subscription::only("posts", &types)
            ]
        );
        assert_eq!(
            built[0].0.delivery(),
            crate::operator::Delivery::AtLeastOnce
        );
        let error = Registry::new()
            .build(&configs(
                "[[operators]]\nname = \"notify\"\nwebhook = { url = \"https://example.com/\", \
                 entities = [\"comments\"], ca_file = \"/nonexistent/ca.pem\" }",
            ))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("operators.notify: webhook ca_file \"/nonexistent/ca.pem\": "),
            "{error}"
        );
    }

    #[test]
    fn a_setting_of_the_wrong_type_is_refused_naming_its_key() {
        #[derive(serde::Deserialize)]
        struct Settings {
            #[allow(dead_code)]
            uppercase: bool,
        }
        let registry = Registry::new().register_with("named", |_: Settings| Ok(Named("named")));
        let error = registry
            .build(&configs(
                "[[operators]]\nname = \"named\"\nsettings = { uppercase = \"yes\" }",
            ))
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("operators.named.settings.uppercase: "),
            "{message}"
        );
        assert!(message.contains("boolean"), "{message}");
    }
}
