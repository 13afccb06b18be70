//! [`ConfigError`]: a setting with a bad value, named by its field. The library never knows the
//! command line's flag names; the CLI maps fields to flags.

/// `field` is the config field (dotted for nested ones, e.g. `optimizer.lr`), `problem` what is
/// wrong with its value.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// `Ok` when `ok`, else the [`ConfigError`] of `field` with the `problem` described.
pub fn ensure(ok: bool, field: &'static str, problem: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError { field, problem: problem() })
    }
}
