//! `${VAR}` substitution from the process environment, done once at load.

use super::ConfigError;

/// Replaces every `${NAME}` in `raw` with the value of the environment variable `NAME`.
/// `key` names the config entry being expanded so that an error points at it; the error never carries a value.
pub fn expand(key: &str, raw: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| ConfigError::invalid(key, "unterminated `${` (expected `${NAME}`)"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError::invalid(
                key,
                format!("`${{{name}}}` is not a valid environment variable reference"),
            ));
        }
        let value =
            lookup(name).ok_or_else(|| ConfigError::MissingEnv { key: key.to_string(), var: name.to_string() })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "s3cret".to_string())
    }

    #[test]
    fn substitutes_known_variables() {
        assert_eq!(expand("k", "Bearer ${KEY}!", &env).unwrap(), "Bearer s3cret!");
        assert_eq!(expand("k", "plain", &env).unwrap(), "plain");
    }

    #[test]
    fn missing_variable_names_key_and_variable() {
        let err = expand("upstreams.a.headers.X", "${NOPE}", &env).unwrap_err().to_string();
        assert!(err.contains("upstreams.a.headers.X") && err.contains("NOPE"), "{err}");
    }

    #[test]
    fn malformed_references_are_refused() {
        assert!(expand("k", "${KEY", &env).is_err());
        assert!(expand("k", "${BAD-NAME}", &env).is_err());
    }
}
