//! Loading a role's config: the TOML file, then command-line overrides, then
//! validation — all before any port is bound. A bad config prints every problem
//! with its key (and the file and line where TOML gives one) and exits with 2.

use std::{path::Path, process::ExitCode};

use serde::de::DeserializeOwned;

/// Command-line flags that override keys of the file, as dotted TOML keys.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    values: Vec<(&'static str, toml::Value)>,
}

impl Overrides {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to the flag's text when given.
    pub(crate) fn string(mut self, key: &'static str, value: Option<impl ToString>) -> Self {
        if let Some(value) = value {
            self.values.push((key, toml::Value::String(value.to_string())));
        }
        self
    }

    /// Sets `key` to a path when given.
    pub(crate) fn path(self, key: &'static str, value: Option<std::path::PathBuf>) -> Self {
        self.string(key, value.map(|p| p.display().to_string()))
    }

    /// Sets `key = true` when the flag is present.
    pub(crate) fn flag(mut self, key: &'static str, on: bool) -> Self {
        if on {
            self.values.push((key, toml::Value::Boolean(true)));
        }
        self
    }

    fn apply(&self, table: &mut toml::Table) {
        for (key, value) in &self.values {
            let parts: Vec<&str> = key.split('.').collect();
            set(table, &parts, value.clone());
        }
    }
}

fn set(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = table.entry((*first).to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                set(inner, rest, value);
            }
        }
    }
}

/// Parses `text` (from `source`, for messages), applies `overrides`, deserializes.
pub(crate) fn parse<T: DeserializeOwned>(text: &str, source: &str, overrides: &Overrides) -> Result<T, String> {
    if overrides.values.is_empty() {
        return toml::from_str(text).map_err(|error| format!("{source}: {error}"));
    }
    let mut table: toml::Table = toml::from_str(text).map_err(|error| format!("{source}: {error}"))?;
    overrides.apply(&mut table);
    // Re-check the file alone first so its errors keep their line numbers...
    if let Err(error) = toml::from_str::<T>(text) {
        let message = error.message();
        if !message.starts_with("missing field") {
            return Err(format!("{source}: {error}"));
        }
    }
    // ...then the file with the flags applied.
    T::deserialize(toml::Value::Table(table)).map_err(|error| format!("{source} with command-line flags: {error}"))
}

/// Loads, overrides and validates a role's config; on failure prints the problems
/// and returns the exit code (2).
pub(crate) fn load<T, V, E>(path: Option<&Path>, overrides: Overrides, validate: V) -> Result<T, ExitCode>
where
    T: DeserializeOwned,
    V: FnOnce(&T) -> Result<(), E>,
    E: std::fmt::Display,
{
    let (text, source) = match path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (text, path.display().to_string()),
            Err(error) => {
                eprintln!("error: cannot read config {}: {error}", path.display());
                return Err(ExitCode::from(2));
            }
        },
        None => (String::new(), "command line".to_string()),
    };
    let config = parse::<T>(&text, &source, &overrides).map_err(|message| {
        eprintln!("error: invalid config {message}");
        ExitCode::from(2)
    })?;
    if let Err(problems) = validate(&config) {
        eprintln!("error: invalid config {source}:");
        for line in problems.to_string().lines() {
            eprintln!("  {line}");
        }
        return Err(ExitCode::from(2));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        root: String,
        #[serde(default)]
        listen: Listen,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Listen {
        http: Option<std::net::SocketAddr>,
    }

    fn example<T: DeserializeOwned>(name: &str) -> T {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        parse(&text, name, &Overrides::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_example_configs_load_and_validate() {
        example::<cdn_origin::Config>("origin.toml").validate().unwrap();
        example::<cdn_edge::Config>("edge.toml").validate().unwrap();
        example::<cdn_control::server::Config>("control.toml").validate().unwrap();
        example::<cdn_geo::Config>("geo.toml").validate().unwrap();
    }

    #[test]
    fn unknown_keys_name_the_key_file_and_line() {
        let err = parse::<Sample>("root = \"x\"\nbogus = 1\n", "a.toml", &Overrides::new()).unwrap_err();
        assert!(err.contains("a.toml") && err.contains("bogus") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn flags_override_and_fill_required_keys() {
        let o = Overrides::new().string("root", Some("/srv")).string("listen.http", Some("127.0.0.1:1"));
        let s: Sample = parse("", "command line", &o).unwrap();
        assert_eq!(s.root, "/srv");
        assert_eq!(s.listen.http, Some("127.0.0.1:1".parse().unwrap()));
        let o = Overrides::new().string("listen.http", Some("nonsense"));
        let err = parse::<Sample>("root = \"x\"", "f.toml", &o).unwrap_err();
        assert!(err.contains("listen") || err.contains("http"), "{err}");
    }
}
