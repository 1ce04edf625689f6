use std::path::PathBuf;

/// Why a configuration could not be loaded. Every variant names the file, key or variable at fault and never
/// carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Line, column and the offending line, with its strings masked (see [`ConfigError::parse`]).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: environment variable {var} is not set")]
    MissingEnv { key: String, var: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }

    /// toml's own message quotes the offending line, and a secret written in the file would be quoted with
    /// it: the message is rebuilt with the line's string values (and comments) masked, and any string the
    /// message quotes (`invalid type: string "..."`) masked too.
    pub fn parse(path: &std::path::Path, text: &str, error: &toml::de::Error) -> ConfigError {
        let message = match error.span() {
            Some(span) => excerpt(text, span.start, span.end, &mask_quoted(error.message())),
            None => mask_quoted(&error.to_string()),
        };
        ConfigError::Parse { path: path.to_path_buf(), message }
    }
}

const MASK: &str = "***";

/// `TOML parse error at line L, column C`, the line masked, a caret under the span, then `message`.
fn excerpt(text: &str, start: usize, end: usize, message: &str) -> String {
    let mut start = start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_index = text[..line_start].matches('\n').count();
    let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i);
    let mut state = Lex::Code;
    for earlier in text[..line_start].split_inclusive('\n') {
        state = mask_line(earlier, state).2;
    }
    let (masked, columns, _) = mask_line(&text[line_start..line_end], state);
    let at = |offset: usize| columns[offset.clamp(line_start, line_end) - line_start];
    let column = text.get(line_start..start).map_or(start - line_start, |s| s.chars().count()) + 1;
    let (first, last) = (at(start), at(end.max(start + 1)).max(at(start) + 1));
    let line_number = (line_index + 1).to_string();
    let gutter = " ".repeat(line_number.len());
    format!(
        "TOML parse error at line {line_number}, column {column}\n{gutter} |\n{line_number} | {masked}\n{gutter} | {}{}\n{message}",
        " ".repeat(first),
        "^".repeat(last - first)
    )
}

/// Where a line starts or ends, lexically: strings that continue over lines carry their state to the next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lex {
    Code,
    MultiBasic,
    MultiLiteral,
}

/// `line` with every string value and comment replaced by [`MASK`] (quoted keys, followed by `=` or `.`,
/// are kept), the masked text's column for each byte offset of `line` (and its end), and the state after it.
fn mask_line(line: &str, mut state: Lex) -> (String, Vec<usize>, Lex) {
    let mut out = String::new();
    let mut width = 0;
    let mut columns = vec![0; line.len() + 1];
    let push = |out: &mut String, width: &mut usize, text: &str| {
        out.push_str(text);
        *width += text.chars().count();
    };
    if state != Lex::Code && !line.trim().is_empty() {
        push(&mut out, &mut width, MASK);
    }
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        match state {
            Lex::MultiBasic | Lex::MultiLiteral => {
                let closing = if state == Lex::MultiBasic { "\"\"\"" } else { "'''" };
                let end = string_end(rest, closing, state == Lex::MultiBasic);
                columns[i..i + end.unwrap_or(rest.len())].fill(width);
                match end {
                    Some(end) => {
                        columns[i + end..i + end + 3].fill(width);
                        push(&mut out, &mut width, closing);
                        state = Lex::Code;
                        i += end + 3;
                    }
                    None => i = line.len(),
                }
            }
            Lex::Code if rest.starts_with("\"\"\"") || rest.starts_with("'''") => {
                columns[i..i + 3].fill(width);
                push(&mut out, &mut width, &rest[..3]);
                state = if rest.starts_with('"') { Lex::MultiBasic } else { Lex::MultiLiteral };
                if !rest[3..].trim().is_empty() {
                    push(&mut out, &mut width, MASK);
                }
                i += 3;
            }
            Lex::Code if rest.starts_with(['"', '\'']) => {
                let quote = &rest[..1];
                let closed = string_end(&rest[1..], quote, quote == "\"").map(|end| end + 2);
                let len = closed.unwrap_or(rest.len());
                let is_key = closed.is_some() && rest[len..].trim_start_matches([' ', '\t']).starts_with(['=', '.']);
                if is_key {
                    for (offset, c) in rest[..len].char_indices() {
                        columns[i + offset] = width;
                        push(&mut out, &mut width, c.encode_utf8(&mut [0; 4]));
                    }
                } else {
                    columns[i..i + len].fill(width);
                    push(&mut out, &mut width, quote);
                    push(&mut out, &mut width, MASK);
                    if closed.is_some() {
                        push(&mut out, &mut width, quote);
                    }
                }
                i += len;
            }
            Lex::Code if rest.starts_with('#') => {
                columns[i..].fill(width);
                let comment = rest.trim_end_matches(['\r', '\n']);
                push(&mut out, &mut width, if comment.len() > 1 { "# ***" } else { comment });
                i = line.len();
            }
            Lex::Code => {
                let c = rest.chars().next().unwrap_or(' ');
                columns[i..i + c.len_utf8()].fill(width);
                if c != '\n' && c != '\r' {
                    push(&mut out, &mut width, c.encode_utf8(&mut [0; 4]));
                }
                i += c.len_utf8();
            }
        }
    }
    columns[line.len()] = width;
    (out, columns, state)
}

/// Where `closing` ends a string's content `text` (a `\` escapes the next character in basic strings).
fn string_end(text: &str, closing: &str, escapes: bool) -> Option<usize> {
    let mut i = 0;
    while i < text.len() {
        if escapes && text.as_bytes()[i] == b'\\' {
            i += 1 + text[i + 1..].chars().next().map_or(0, char::len_utf8);
        } else if text[i..].starts_with(closing) {
            return Some(i);
        } else if text.as_bytes()[i] == b'\n' && closing.len() == 1 {
            return None;
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    None
}

/// `message` with the content of every `"..."` pair masked.
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        let Some(close) = rest[open + 1..].find('"') else { break };
        out.push_str(&rest[..=open]);
        out.push_str(MASK);
        out.push('"');
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(text: &str) -> String {
        let error = toml::from_str::<toml::Table>(text).expect_err("invalid");
        ConfigError::parse(std::path::Path::new("gateway.toml"), text, &error).to_string()
    }

    #[test]
    fn a_syntax_error_names_line_and_column_and_masks_the_strings_of_its_line() {
        let shown = parse_error("[server]\nlisten = \"x\"\nkey = \"sk-SECRET\" \"again\" # SECRET too\n");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("line 3, column 19"), "{shown}");
        // The caret under the second string, where toml points.
        let excerpt = format!("3 | key = \"***\" \"***\" # ***\n  | {}^\n", " ".repeat(12));
        assert!(shown.contains(&excerpt), "{shown}");
    }

    #[test]
    fn quoted_keys_stay_and_unterminated_strings_are_masked() {
        let shown = parse_error("headers = { \"X-Key\" = \"sk-SECRET }\n");
        assert!(!shown.contains("SECRET") && shown.contains("\"X-Key\" = \"***"), "{shown}");
        let shown = parse_error("key = 'sk-SECRET\n");
        assert!(!shown.contains("SECRET") && shown.contains("line 1"), "{shown}");
        let shown = parse_error("key = \"caf\\é sk-SECRET\n");
        assert!(!shown.contains("SECRET") && shown.contains("line 1"), "{shown}");
    }

    #[test]
    fn a_line_inside_a_multi_line_string_is_masked() {
        let shown = parse_error("a = \"\"\"first\nsk-SECRET\"\"\" oops\n");
        assert!(!shown.contains("SECRET") && shown.contains("2 | ***\"\"\" oops"), "{shown}");
    }

    #[test]
    fn a_value_quoted_in_the_message_is_masked() {
        assert_eq!(
            mask_quoted("invalid type: string \"sk-SECRET\", expected u64"),
            "invalid type: string \"***\", expected u64"
        );
        assert_eq!(mask_quoted("expected `\"`"), "expected `\"`");
    }
}
