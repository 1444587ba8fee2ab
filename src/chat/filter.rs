//! The content filter: blocked words, matched ASCII-case-insensitively, either reject
//! the message (42202) or are masked with `*`, as configured.

use crate::codes::ApiError;
use crate::config::{Config, FilterMode};

pub fn apply(cfg: &Config, content: String) -> Result<String, ApiError> {
    if cfg.blocked_words.is_empty() {
        return Ok(content);
    }
    let lower = content.to_ascii_lowercase();
    let mut hits: Vec<(usize, usize)> = Vec::new();
    for w in &cfg.blocked_words {
        let w = w.to_ascii_lowercase();
        hits.extend(lower.match_indices(&w).map(|(i, m)| (i, i + m.len())));
    }
    if hits.is_empty() {
        return Ok(content);
    }
    match cfg.filter_mode {
        FilterMode::Reject => Err(ApiError::ContentRejected),
        FilterMode::Mask => {
            // ASCII lower-casing keeps byte offsets, and blocked words start and end on
            // char boundaries of `lower`, hence of `content`.
            let mut bytes = content.into_bytes();
            for (start, end) in hits {
                let n = std::str::from_utf8(&bytes[start..end])
                    .map_or(end - start, |s| s.chars().count());
                let stars = "*".repeat(n);
                // Replacing a char run by as many ASCII stars can shrink it; rebuild.
                let mut out = Vec::with_capacity(bytes.len());
                out.extend_from_slice(&bytes[..start]);
                out.extend_from_slice(stars.as_bytes());
                out.extend_from_slice(&bytes[end..]);
                if out.len() == bytes.len() {
                    bytes = out;
                } else {
                    // Offsets of later hits moved: mask what is left again.
                    let rest = String::from_utf8_lossy(&out).into_owned();
                    return apply(cfg, rest);
                }
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_and_mask() {
        let mut cfg = Config {
            blocked_words: vec!["bad".into()],
            ..Config::default()
        };
        assert_eq!(apply(&cfg, "fine".into()), Ok("fine".into()));
        assert_eq!(apply(&cfg, "so BAD".into()), Err(ApiError::ContentRejected));
        cfg.filter_mode = FilterMode::Mask;
        assert_eq!(
            apply(&cfg, "{\"t\":\"bad and Bad\"}".into()),
            Ok("{\"t\":\"*** and ***\"}".into())
        );
        cfg.blocked_words = vec!["ü".into()];
        assert_eq!(apply(&cfg, "xüyü".into()), Ok("x*y*".into()));
    }
}
