//! The pgoutput decoder and the conversion of column values to JSON.
