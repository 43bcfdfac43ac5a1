//! The routing document as the API takes it: the body of `PUT /v1/routing` (JSON,
//! or TOML under `Content-Type: application/toml`), read and validated into a
//! [`Routing`] or refused with every problem, each naming its field. The document
//! itself, its rules and its delivery live in [`cdn_cluster::routing`].
//!
//! # Layout
//! - [`store`]: the routing document a control node holds, kept durably in its
//!   `data_dir`.

pub mod store;

pub use cdn_cluster::routing::{Routing, Versioned};
use serde::{Deserialize, Serialize};

/// How a routing document is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON (the default of `PUT /v1/routing`).
    Json,
    /// TOML (`default_site = ".."`, `[[sites]]`, `[[sites.origins]]`, `[[sites.rules]]`).
    Toml,
}

impl Format {
    /// The format of a body with this `Content-Type` (absent or anything else than
    /// `application/toml`: JSON).
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        let essence = content_type.and_then(|value| value.split(';').next()).map(str::trim);
        match essence {
            Some(essence) if essence.eq_ignore_ascii_case("application/toml") => Self::Toml,
            _ => Self::Json,
        }
    }

    /// The format of a file, by its name: `.toml` is TOML, anything else JSON.
    pub fn from_path(path: &std::path::Path) -> Self {
        match path.extension() {
            Some(extension) if extension.eq_ignore_ascii_case("toml") => Self::Toml,
            _ => Self::Json,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Toml => "application/toml",
        }
    }
}

/// Why a routing document is refused: a summary and every problem, each as
/// `field.path: what is wrong` (what `400` answers carry as `error` and `problems`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One line.
    pub error: String,
    /// Every problem.
    pub problems: Vec<String>,
}

/// Reads and validates a document in `format`; a [`Refusal`] names what is wrong.
pub fn parse(body: &[u8], format: Format) -> Result<Routing, Refusal> {
    let read = match format {
        Format::Json => Routing::from_json(body),
        Format::Toml => match std::str::from_utf8(body) {
            Ok(text) => Routing::from_toml(text),
            Err(error) => {
                let problem = format!("the TOML document is not UTF-8: {error}");
                return Err(Refusal { error: format!("invalid routing document: {problem}"), problems: vec![problem] });
            }
        },
    };
    let routing = read.map_err(|error| {
        let problem = one_line(&error.to_string());
        Refusal { error: format!("invalid routing document: {problem}"), problems: vec![problem] }
    })?;
    routing.validate().map_err(|problems| Refusal {
        error: format!("invalid routing document: {}", problems.join("; ")),
        problems,
    })?;
    Ok(routing)
}

/// A parser's message on one line: the TOML parser's shows the line it stopped at
/// under the message (`5 | weight = "x"`, `  |   ^^^`); those lines go, the
/// others are joined with `: `.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> =
        message.lines().map(str::trim).filter(|line| !line.is_empty() && !line.contains('|')).collect();
    lines.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_content_types_and_file_names() {
        assert_eq!(Format::from_content_type(None), Format::Json);
        assert_eq!(Format::from_content_type(Some("application/json")), Format::Json);
        assert_eq!(Format::from_content_type(Some("Application/TOML; charset=utf-8")), Format::Toml);
        assert_eq!(Format::from_content_type(Some("text/plain")), Format::Json);
        assert_eq!(Format::from_path("a/b.TOML".as_ref()), Format::Toml);
        assert_eq!(Format::from_path("routing.json".as_ref()), Format::Json);
        assert_eq!(Format::from_path("routing".as_ref()), Format::Json);
    }

    #[test]
    fn refusals_name_the_field() {
        let json =
            br#"{"sites": [{"name": "a", "origins": [{"url": "http://o"}, {"url": "http://p", "weight": "x"}]}]}"#;
        let refusal = parse(json, Format::Json).unwrap_err();
        assert!(refusal.problems[0].starts_with("sites[0].origins[1].weight: "), "{refusal:?}");
        assert!(refusal.error.starts_with("invalid routing document: sites[0]"), "{refusal:?}");

        let refusal = parse(br#"{"default_site": "nope", "sites": []}"#, Format::Json).unwrap_err();
        assert_eq!(refusal.problems.len(), 1);
        assert!(refusal.problems[0].starts_with("default_site: "), "{refusal:?}");

        let toml = "[[sites]]\nname = \"a\"\n[[sites.origins]]\nurl = \"http://o\"\nweight = 0\n";
        let refusal = parse(toml.as_bytes(), Format::Toml).unwrap_err();
        assert!(refusal.problems[0].starts_with("sites[0].origins[0].weight: "), "{refusal:?}");
        let toml = toml.replace("weight = 0", "weight = \"x\"");
        let refusal = parse(toml.as_bytes(), Format::Toml).unwrap_err();
        assert_eq!(
            refusal.problems,
            [
                "sites[0].origins[0].weight: TOML parse error at line 5, column 10: invalid type: string \"x\", expected u32"
            ]
        );
        assert!(parse(b"\xff", Format::Toml).unwrap_err().error.contains("UTF-8"));

        let good = "default_site = \"a\"\n[[sites]]\nname = \"a\"\nhosts = [\"a.test\"]\n[[sites.origins]]\nurl = \"http://o\"\n";
        let routing = parse(good.as_bytes(), Format::Toml).unwrap();
        assert_eq!(parse(routing.to_json().as_bytes(), Format::Json).unwrap(), routing);
    }
}
