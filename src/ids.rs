//! Identifiers of docs/PROTOCOL.md: user, device and group ids, and conversation ids.

use crate::codes::ApiError;
use crate::limits::MAX_ID_LEN;
use crate::proto::pb::ConvType;

/// True when `s` is 1-64 chars of `[A-Za-z0-9_.@]`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'@')
}

/// Checks an id and names the field when it is bad (40001).
pub fn check_id(field: &str, s: &str) -> Result<(), ApiError> {
    if is_valid_id(s) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} must be 1-{MAX_ID_LEN} chars of [A-Za-z0-9_.@]"
        )))
    }
}

/// `p2p-{a}-{b}` with a < b bytewise. The caller has checked both ids.
pub fn p2p_conv_id(x: &str, y: &str) -> String {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    let mut s = String::with_capacity(5 + a.len() + b.len());
    s.push_str("p2p-");
    s.push_str(a);
    s.push('-');
    s.push_str(b);
    s
}

/// The prefix of group conversation ids.
pub const GROUP_CONV_PREFIX: &str = "grp-";

/// `grp-{group_id}`.
pub fn group_conv_id(group: &str) -> String {
    format!("grp-{group}")
}

/// True when `s` is a valid conv_id (what [`ConvRef::parse`] accepts), without building
/// an error: for hot paths that drop what is not one.
pub fn is_valid_conv_id(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix("p2p-") {
        rest.split_once('-')
            .is_some_and(|(a, b)| is_valid_id(a) && is_valid_id(b) && a < b)
    } else {
        s.strip_prefix(GROUP_CONV_PREFIX).is_some_and(is_valid_id)
    }
}

/// A parsed, valid conversation id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConvRef<'a> {
    P2p { a: &'a str, b: &'a str },
    Group { group: &'a str },
}

impl<'a> ConvRef<'a> {
    /// Parses and checks a conv_id (40001 when it is not one of the two forms).
    pub fn parse(conv_id: &'a str) -> Result<Self, ApiError> {
        if let Some(rest) = conv_id.strip_prefix("p2p-") {
            if let Some((a, b)) = rest.split_once('-') {
                if is_valid_id(a) && is_valid_id(b) && a < b {
                    return Ok(ConvRef::P2p { a, b });
                }
            }
        } else if let Some(group) = conv_id.strip_prefix("grp-") {
            if is_valid_id(group) {
                return Ok(ConvRef::Group { group });
            }
        }
        Err(ApiError::invalid(
            "conv_id must be p2p-{a}-{b} (a < b) or grp-{group_id}",
        ))
    }

    pub fn conv_type(&self) -> ConvType {
        match self {
            ConvRef::P2p { .. } => ConvType::P2p,
            ConvRef::Group { .. } => ConvType::Group,
        }
    }

    /// For p2p: whether `user` is one of the two parties.
    pub fn p2p_has(&self, user: &str) -> bool {
        matches!(self, ConvRef::P2p { a, b } if *a == user || *b == user)
    }

    /// For p2p: the party that is not `user`.
    pub fn p2p_peer(&self, user: &str) -> Option<&'a str> {
        match self {
            ConvRef::P2p { a, b } if *a == user => Some(b),
            ConvRef::P2p { a, b } if *b == user => Some(a),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("usr_abc.x@y"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a-b"));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id("ü"));
    }

    #[test]
    fn conv_ids() {
        assert_eq!(p2p_conv_id("usr_def", "usr_abc"), "p2p-usr_abc-usr_def");
        let c = ConvRef::parse("p2p-usr_abc-usr_def").unwrap();
        assert_eq!(c.p2p_peer("usr_abc"), Some("usr_def"));
        assert!(ConvRef::parse("p2p-usr_def-usr_abc").is_err());
        assert!(ConvRef::parse("p2p-a-a").is_err());
        assert!(ConvRef::parse("p2p-a-b-c").is_err());
        assert_eq!(
            ConvRef::parse("grp-g1").unwrap(),
            ConvRef::Group { group: "g1" }
        );
        assert!(ConvRef::parse("grp-").is_err());
        assert!(ConvRef::parse("xyz").is_err());
        for s in [
            "p2p-usr_abc-usr_def",
            "p2p-usr_def-usr_abc",
            "p2p-a-a",
            "p2p-a-b-c",
            "grp-g1",
            "grp-",
            "grp-a-b",
            "xyz",
            "",
        ] {
            assert_eq!(is_valid_conv_id(s), ConvRef::parse(s).is_ok(), "{s}");
        }
    }
}
