//! The registry: Rust operators by the name a configuration's `[[operators]]` gives them.
//!
//! ```text
//! [[operators]] name = "x", settings = {..} ──► Registry: "x" ─► constructor(settings as S) ─► operator
//! [[operators]] name = "y", query = "..."   ──► SqlOperator::from_config (no registration)
//! ```

use std::collections::BTreeMap;
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
         are {known}; a declarative operator needs `query` and `id`"
    )]
    Unknown {
        /// The name in the configuration.
        name: String,
        /// The registered names.
        known: String,
    },
    /// The operator's `settings` do not fit what its constructor takes.
    #[error("operators.{name}.settings: {message}")]
    Settings {
        /// The operator.
        name: String,
        /// The setting and what is wrong with it.
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
    /// [`Operator::name`]; `build` makes it.
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
    /// `operators.NAME.settings`.
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
                toml::Value::Table(settings.clone())
                    .try_into()
                    .map_err(|e: toml::de::Error| RegistryError::Settings {
                        name: owned.clone(),
                        message: e.message().to_owned(),
                    })?;
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
        self.constructors.insert(name.to_owned(), constructor);
        self
    }

    /// Takes in every operator `other` registers (replacing those of the same name).
    pub fn merge(mut self, other: Registry) -> Self {
        self.constructors.extend(other.constructors);
        self
    }

    /// The registered names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.constructors.keys().map(String::as_str)
    }

    /// The operators `configs` name: declarative ones (with `query`) from their entry, Rust
    /// ones from this registry with their settings.
    pub fn build(&self, configs: &[OperatorConfig]) -> Result<Vec<AnyOperator>, RegistryError> {
        configs
            .iter()
            .map(|config| {
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
