//! The content filter: blocked words, matched ASCII-case-insensitively, either reject
//! the message (42202) or are masked with `*`, as configured.
//!
//! All words are matched in one pass by an Aho-Corasick automaton built once at
//! start-up ([`Filter::new`]) and shared by every shard: linear in the content, however
//! many words and hits, and with no recursion (a 60 KB content of multi-byte hits once
//! overflowed the stack of the old per-hit rebuild).

use aho_corasick::{AhoCorasick, MatchKind};

use crate::codes::ApiError;
use crate::config::FilterMode;

/// The blocked words of the configuration, compiled.
#[derive(Debug, Clone)]
pub struct Filter {
    /// `None` when no word is blocked: every content passes untouched.
    matcher: Option<AhoCorasick>,
    mode: FilterMode,
}

/// The automaton could not be built (only for word lists far beyond any sane size).
#[derive(Debug)]
pub struct FilterError(aho_corasick::BuildError);

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot compile the blocked words: {}", self.0)
    }
}

impl std::error::Error for FilterError {}

/// No blocked words: every content passes.
impl Default for Filter {
    fn default() -> Filter {
        Filter {
            matcher: None,
            mode: FilterMode::Reject,
        }
    }
}

impl Filter {
    /// Compiles `words` (empty ones are ignored). Overlapping words match
    /// leftmost-longest: of `ab` and `abc`, `abcd` masks `abc`.
    pub fn new(words: &[String], mode: FilterMode) -> Result<Filter, FilterError> {
        let words: Vec<&str> = words
            .iter()
            .map(String::as_str)
            .filter(|w| !w.is_empty())
            .collect();
        let matcher = if words.is_empty() {
            None
        } else {
            let ac = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::LeftmostLongest)
                .build(&words)
                .map_err(FilterError)?;
            Some(ac)
        };
        Ok(Filter { matcher, mode })
    }

    /// Checks `content`: in `reject` mode a blocked word is 42202; in `mask` mode each
    /// matched word becomes as many `*` as it has chars.
    pub fn apply(&self, content: String) -> Result<String, ApiError> {
        let Some(ac) = &self.matcher else {
            return Ok(content);
        };
        match self.mode {
            FilterMode::Reject if ac.is_match(&content) => Err(ApiError::ContentRejected),
            FilterMode::Reject => Ok(content),
            FilterMode::Mask => Ok(mask(ac, content)),
        }
    }
}

fn mask(ac: &AhoCorasick, content: String) -> String {
    let bytes = content.as_bytes();
    let mut matches = ac.find_iter(bytes).peekable();
    if matches.peek().is_none() {
        return content;
    }
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut last = 0;
    for m in matches {
        out.extend_from_slice(&bytes[last..m.start()]);
        // A char is one leading (non-continuation) byte and its continuations.
        let chars = bytes[m.start()..m.end()]
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count();
        out.resize(out.len() + chars, b'*');
        last = m.end();
    }
    out.extend_from_slice(&bytes[last..]);
    // Words are whole UTF-8 strings, so matches start and end on char boundaries and
    // the output is UTF-8; the lossy path is never taken.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(words: &[&str], mode: FilterMode) -> Filter {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        Filter::new(&words, mode).unwrap()
    }

    fn masked(words: &[&str], content: &str) -> String {
        filter(words, FilterMode::Mask)
            .apply(content.into())
            .unwrap()
    }

    #[test]
    fn reject() {
        let f = filter(&["bad"], FilterMode::Reject);
        assert_eq!(f.apply("fine".into()), Ok("fine".into()));
        assert_eq!(f.apply("so BAD".into()), Err(ApiError::ContentRejected));
        assert_eq!(f.apply("bAd!".into()), Err(ApiError::ContentRejected));
        let none = filter(&[], FilterMode::Reject);
        assert_eq!(none.apply("bad".into()), Ok("bad".into()));
        let empty_word = filter(&[""], FilterMode::Reject);
        assert_eq!(empty_word.apply("anything".into()), Ok("anything".into()));
    }

    #[test]
    fn mask_ascii_and_mixed_case() {
        assert_eq!(
            masked(&["bad"], "{\"t\":\"bad and Bad\"}"),
            "{\"t\":\"*** and ***\"}"
        );
        assert_eq!(masked(&["BaD"], "xbAdy"), "x***y");
        assert_eq!(masked(&["bad"], "nothing here"), "nothing here");
    }

    #[test]
    fn mask_multi_byte() {
        assert_eq!(masked(&["ü"], "xüyü"), "x*y*");
        assert_eq!(masked(&["坏词"], "好坏词好"), "好**好");
        // Only ASCII folds: Ü is not ü.
        assert_eq!(masked(&["ü"], "Ü"), "Ü");
        assert_eq!(masked(&["straße"], "STRAßE"), "******");
    }

    #[test]
    fn mask_overlapping_words() {
        // Leftmost-longest: the longer of two words starting at one place wins.
        assert_eq!(masked(&["ab", "abc"], "abcd"), "***d");
        // Overlapping words at different places: the leftmost wins, then go on after it.
        assert_eq!(masked(&["abc", "bcd"], "abcde"), "***de");
        assert_eq!(masked(&["aa"], "aaaaa"), "****a");
        assert_eq!(masked(&["坏", "坏词"], "坏词坏"), "***");
    }

    #[test]
    fn sixty_kb_of_cjk_hits_in_one_pass() {
        let content = "坏词".repeat(10_000);
        assert_eq!(content.len(), 60_000);
        let out = masked(&["坏词"], &content);
        assert_eq!(out, "*".repeat(20_000));
        let mixed = "坏词a".repeat(8_000);
        assert_eq!(masked(&["坏词"], &mixed), "**a".repeat(8_000));
    }
}
