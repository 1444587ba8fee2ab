//! Lua scripts by hash: `EVALSHA` first (only the 40-byte hash goes over the wire),
//! and on `NOSCRIPT` (a restarted or flushed server, a failover to a replica that
//! never saw the script) `EVAL` with the body, which also caches it for the next call.
//!
//! The store writes each round of batches with one script that checks the stored max
//! seq of every conversation it adds messages to before writing anything (the fencing
//! of DESIGN.md, [`super::backend`]). That writer keeps several rounds in flight, so
//! it cannot wait for a `NOSCRIPT` reply to resend a round with `EVAL` (a later round
//! could run first): it sends `SCRIPT LOAD` ahead of its first round on each new
//! connection instead, in the same write, and treats `NOSCRIPT` as a failed round.

use ::redis::Value;

use super::{RedisConn, RedisError};

/// A Lua script and its SHA1, computed once.
#[derive(Debug, Clone)]
pub struct LuaScript {
    code: String,
    sha1: String,
}

impl LuaScript {
    pub fn new(code: &str) -> LuaScript {
        LuaScript {
            code: code.to_string(),
            sha1: ::redis::Script::new(code).get_hash().to_string(),
        }
    }

    /// The hex SHA1 that `EVALSHA` names the script by.
    pub fn sha1(&self) -> &str {
        &self.sha1
    }

    /// The script's source.
    pub fn code(&self) -> &str {
        &self.code
    }
}

/// Runs `script` with `keys` and `args` and returns its reply. Calls from one loop
/// turn share one write like any other. A script that raises an error
/// (`redis.error_reply`, a runtime error) returns [`RedisError::Server`].
pub async fn run_script(
    conn: &RedisConn,
    script: &LuaScript,
    keys: &[&[u8]],
    args: &[&[u8]],
) -> Result<Value, RedisError> {
    let reply = conn
        .cmd(&invocation("EVALSHA", &script.sha1, keys, args))
        .await?;
    let reply = match reply {
        Value::ServerError(e) if e.code() == "NOSCRIPT" => {
            conn.cmd(&invocation("EVAL", &script.code, keys, args))
                .await?
        }
        other => other,
    };
    match reply {
        Value::ServerError(e) => Err(RedisError::from_server(&e)),
        other => Ok(other),
    }
}

/// `EVALSHA sha n keys.. args..` or `EVAL body n keys.. args..`.
fn invocation(verb: &str, first: &str, keys: &[&[u8]], args: &[&[u8]]) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd(verb);
    cmd.arg(first).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    for a in args {
        cmd.arg(*a);
    }
    cmd
}
