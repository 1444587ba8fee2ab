//! One hashed timer wheel per shard for heartbeat deadlines: no timer task per
//! connection. Resolution is one second.
//!
//! A connection sits in one slot (a `Weak`, 8 bytes); `Conn::filed_at` names it. When
//! its slot comes round the shard looks at the connection's deadlines (heartbeat,
//! unfinished frame, close linger): one that passed closes it; otherwise it moves to
//! the slot of its next deadline. A busy connection costs one move per timeout period,
//! however many frames it sends. A deadline earlier than the filed one (a frame
//! starts, a close begins) files the connection again; the older entry is then stale
//! and skipped when its slot comes round (its second is no longer `filed_at`).

use std::rc::Weak;

use super::conn::Conn;

pub struct Wheel {
    slots: Vec<Vec<Weak<Conn>>>,
    /// Seconds since the shard started; advanced by the shard's ticker.
    now: u32,
    timeout: u32,
}

impl Wheel {
    pub fn new(timeout_secs: u32) -> Self {
        Wheel {
            slots: (0..=timeout_secs as usize + 1)
                .map(|_| Vec::new())
                .collect(),
            now: 0,
            timeout: timeout_secs,
        }
    }

    pub fn now(&self) -> u32 {
        self.now
    }

    pub fn timeout(&self) -> u32 {
        self.timeout
    }

    /// Files `conn` under the second `at` (clamped to the wheel's span); returns the
    /// second it was filed under.
    pub fn insert(&mut self, conn: Weak<Conn>, at: u32) -> u32 {
        let at = at.clamp(self.now + 1, self.now + self.slots.len() as u32 - 1);
        let idx = at as usize % self.slots.len();
        self.slots[idx].push(conn);
        at
    }

    /// Advances one second and returns the connections filed under it.
    pub fn advance(&mut self) -> Vec<Weak<Conn>> {
        self.now += 1;
        let idx = self.now as usize % self.slots.len();
        std::mem::take(&mut self.slots[idx])
    }
}
