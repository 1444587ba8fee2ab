// imshard demo chat: one WebSocket speaking the imshard.v1.json subprotocol
// (README "JSON over WebSocket"). 64-bit integers arrive as strings, fields at their
// default value are left out, so every read goes through num() or a default.
'use strict';

const $ = (id) => document.getElementById(id);
const num = (v) => Number(v || 0);
const RECALL_WINDOW_MS = 120000;

const state = {
  token: '',
  me: '',
  ws: null,
  nextReq: 1,
  pending: new Map(), // req_id -> {resolve, reject}
  convs: new Map(), // conv_id -> ConversationItem (numbers normalised)
  msgs: new Map(), // conv_id -> Map(seq -> MsgItem), for conversations opened once
  hasOlder: new Map(), // conv_id -> whether a BACKWARD pull may find more
  open: null, // conv_id shown on the right
  retryMs: 1000,
  stopped: false, // kicked out as "replaced": another tab took this device
};

// ---- connection ----------------------------------------------------------

function setStatus(text, kind) {
  $('status').textContent = text;
  $('status').dataset.state = kind;
}

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(state.token)}`, 'imshard.v1.json');
  state.ws = ws;
  ws.onopen = async () => {
    state.retryMs = 1000;
    try {
      await resync();
      setStatus('connected', 'connected');
    } catch (e) {
      setStatus(`sync failed: ${e.message}`, 'reconnecting');
    }
  };
  ws.onmessage = (ev) => onEnvelope(JSON.parse(ev.data));
  ws.onclose = () => {
    for (const p of state.pending.values()) p.reject(new Error('disconnected'));
    state.pending.clear();
    if (state.stopped) return;
    setStatus('reconnecting', 'reconnecting');
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 8000);
  };
}

// One request: resolves with the XxxResponse as JSON, rejects with "code message".
function call(op, body) {
  return new Promise((resolve, reject) => {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return reject(new Error('not connected'));
    const reqId = state.nextReq++;
    state.pending.set(String(reqId), { resolve, reject });
    state.ws.send(JSON.stringify({ req_id: reqId, [op]: body }));
  });
}

function onEnvelope(env) {
  const p = env.payload || {};
  switch (env.type) {
    case 'RESPONSE': {
      const waiter = state.pending.get(env.req_id);
      state.pending.delete(env.req_id);
      if (!waiter) return;
      if (p.code) waiter.reject(new Error(`${p.code} ${p.message || ''}`));
      else waiter.resolve(p.body || {});
      return;
    }
    case 'MSG_PUSH':
      onMessage(p);
      call('push_ack', { conv_id: p.conv_id, seq: p.seq }).catch(() => {});
      return;
    case 'MSG_RECALL':
      onRecall(p);
      return;
    case 'MSG_MARK_READ': {
      const c = state.convs.get(p.conv_id);
      if (c) c.read_seq = Math.max(c.read_seq, num(p.read_seq));
      render();
      return;
    }
    case 'KICKOUT':
      state.stopped = p.reason === 'replaced';
      setStatus(`kicked out: ${p.reason}`, 'signed-out');
      return;
  }
}

// After every (re)connect: the conversation list, then every conversation held here
// pulled FORWARD from its newest seq, so nothing sent meanwhile is lost, and its
// newest page again, so recalls made meanwhile show; messages are kept by seq, so
// nothing shows twice.
async function resync() {
  await loadConversations();
  for (const convId of state.msgs.keys()) {
    await pullForward(convId);
    const r = await call('pull', { conv_id: convId, limit: 30, direction: 'PULL_DIRECTION_BACKWARD' }).catch(() => ({}));
    store(convId, r.messages || []);
  }
  if (state.open && !state.msgs.has(state.open)) await loadOlder(state.open);
  markOpenRead();
  render();
}

// ---- data ----------------------------------------------------------------

function normConv(c) {
  return {
    conv_id: c.conv_id,
    conv_type: c.conv_type || 'CONV_TYPE_P2P',
    last_msg: c.last_msg ? normMsg(c.last_msg) : null,
    max_seq: num(c.max_seq),
    read_seq: num(c.read_seq),
    updated_at: num(c.updated_at),
  };
}

function normMsg(m) {
  return { ...m, seq: num(m.seq), send_time: num(m.send_time), msg_type: num(m.msg_type), status: num(m.status) };
}

async function loadConversations() {
  let cursor = 0;
  for (;;) {
    const r = await call('get_conversations', { page_size: 100, cursor });
    for (const c of r.conversations || []) {
      const item = normConv(c);
      const old = state.convs.get(item.conv_id);
      if (old) item.read_seq = Math.max(item.read_seq, old.read_seq);
      state.convs.set(item.conv_id, item);
    }
    if (!r.has_more) break;
    cursor = num(r.next_cursor);
  }
}

function store(convId, list) {
  if (!state.msgs.has(convId)) state.msgs.set(convId, new Map());
  const held = state.msgs.get(convId);
  for (const m of list) held.set(num(m.seq), normMsg(m));
  const c = state.convs.get(convId);
  for (const m of list) {
    if (!c) break;
    const seq = num(m.seq);
    if (seq >= c.max_seq) {
      c.max_seq = seq;
      c.last_msg = normMsg(m);
      c.updated_at = Math.max(c.updated_at, num(m.send_time));
    }
  }
}

async function loadOlder(convId) {
  const held = state.msgs.get(convId);
  const oldest = held && held.size ? Math.min(...held.keys()) : 0;
  let r = {};
  try {
    r = await call('pull', { conv_id: convId, anchor_seq: oldest, limit: 30, direction: 'PULL_DIRECTION_BACKWARD' });
  } catch (e) {
    // A p2p conversation before its first message does not exist yet.
    if (!String(e.message).startsWith('404')) throw e;
  }
  store(convId, r.messages || []);
  state.hasOlder.set(convId, !!r.has_more);
}

async function pullForward(convId) {
  for (;;) {
    const held = state.msgs.get(convId);
    const newest = held && held.size ? Math.max(...held.keys()) : 0;
    let r;
    try {
      r = await call('pull', { conv_id: convId, anchor_seq: newest, limit: 100, direction: 'PULL_DIRECTION_FORWARD' });
    } catch (e) {
      return;
    }
    store(convId, r.messages || []);
    if (!r.has_more || !(r.messages || []).length) return;
  }
}

function onMessage(m) {
  if (!state.convs.has(m.conv_id)) {
    // A conversation new to this device: the list has its row.
    loadConversations().then(render, () => {});
  }
  const c = state.convs.get(m.conv_id);
  if (c && !state.msgs.has(m.conv_id)) {
    c.max_seq = Math.max(c.max_seq, num(m.seq));
    c.last_msg = normMsg(m);
  } else if (state.msgs.has(m.conv_id)) {
    store(m.conv_id, [m]);
  }
  if (c && m.from_uuid === state.me) c.read_seq = Math.max(c.read_seq, num(m.seq));
  markOpenRead();
  render();
  if (m.conv_id === state.open) $('messages').scrollTop = $('messages').scrollHeight;
}

function onRecall(n) {
  const held = state.msgs.get(n.conv_id);
  const m = held && held.get(num(n.seq));
  if (m) m.status = 1;
  const c = state.convs.get(n.conv_id);
  if (c && c.last_msg && c.last_msg.seq === num(n.seq)) c.last_msg.status = 1;
  render();
}

// Marks the open conversation read up to its newest message while the tab is visible.
function markOpenRead() {
  const c = state.open && state.convs.get(state.open);
  if (!c || document.hidden || c.read_seq >= c.max_seq) return;
  const seq = c.max_seq;
  c.read_seq = seq;
  call('mark_read', { conv_id: c.conv_id, read_seq: seq }).catch(() => {});
}

// ---- actions -------------------------------------------------------------

function target(convId) {
  const [kind, ...ids] = convId.split('-');
  return kind === 'grp' ? ids.join('-') : ids.find((u) => u !== state.me) || ids[0];
}

async function openConv(convId) {
  state.open = convId;
  if (!state.msgs.has(convId)) await loadOlder(convId);
  markOpenRead();
  render();
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
  $('text').focus();
}

async function send(text) {
  const convId = state.open;
  const group = convId.startsWith('grp-');
  const content = JSON.stringify({ text });
  const clientMsgId = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  const r = await call('send', {
    conv_type: group ? 'CONV_TYPE_GROUP' : 'CONV_TYPE_P2P',
    target: target(convId),
    client_msg_id: clientMsgId,
    content,
  });
  const m = { msg_id: r.msg_id, client_msg_id: clientMsgId, conv_id: r.conv_id, seq: r.seq, from_uuid: state.me, content, send_time: r.send_time };
  if (!state.convs.has(r.conv_id)) await loadConversations();
  store(r.conv_id, [m]);
  const c = state.convs.get(r.conv_id);
  if (c) c.read_seq = Math.max(c.read_seq, num(r.seq));
  render();
  $('messages').scrollTop = $('messages').scrollHeight;
}

async function recall(m) {
  await call('recall', { conv_id: m.conv_id, msg_id: m.msg_id });
  onRecall({ conv_id: m.conv_id, seq: m.seq });
}

// ---- rendering -----------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function describe(m) {
  if (!m) return '';
  if (m.status === 1) return 'message recalled';
  let c = {};
  try { c = JSON.parse(m.content || '{}'); } catch (e) { return m.content; }
  if (m.msg_type >= 100) {
    if (c.event === 'group_created') return `${c.operator} created "${c.name}" with ${(c.members || []).join(', ')}`;
    if (c.event === 'members_changed') return `${c.operator} changed members: +${(c.added || []).join(', ')} -${(c.removed || []).join(', ')}`;
    return c.event || 'system message';
  }
  return typeof c.text === 'string' ? c.text : m.content;
}

function render() {
  const list = $('conv-list');
  list.replaceChildren();
  const convs = [...state.convs.values()].sort((a, b) => b.updated_at - a.updated_at);
  for (const c of convs) {
    const li = el('li', c.conv_id === state.open ? 'open' : '');
    li.dataset.conv = c.conv_id;
    li.dataset.readSeq = c.read_seq;
    const unread = Math.max(0, c.max_seq - c.read_seq);
    li.append(el('span', 'title', c.conv_type === 'CONV_TYPE_GROUP' ? `# ${target(c.conv_id)}` : target(c.conv_id)));
    li.append(el('span', 'badge', unread ? String(unread) : ''));
    li.append(el('span', 'last', describe(c.last_msg)));
    li.onclick = () => openConv(c.conv_id).catch(alertError);
    list.append(li);
  }

  const convId = state.open;
  const c = convId && state.convs.get(convId);
  $('chat-title').textContent = convId ? (convId.startsWith('grp-') ? `# ${target(convId)}` : target(convId)) : 'pick a conversation';
  $('read-mark').textContent = c && c.read_seq ? `read up to #${c.read_seq}` : '';
  $('read-mark').dataset.seq = c ? c.read_seq : 0;
  $('text').disabled = $('send').disabled = !convId;
  $('older').hidden = !convId || !state.hasOlder.get(convId);
  const box = $('msg-list');
  box.replaceChildren();
  const held = (convId && state.msgs.get(convId)) || new Map();
  for (const seq of [...held.keys()].sort((a, b) => a - b)) {
    const m = held.get(seq);
    const mine = m.from_uuid === state.me;
    const li = el('li', `msg${mine ? ' mine' : ''}${m.status === 1 ? ' recalled' : ''}${m.msg_type >= 100 ? ' system' : ''}`);
    li.dataset.seq = seq;
    const time = new Date(m.send_time).toLocaleTimeString();
    li.append(el('div', 'meta', `#${seq} ${mine ? 'me' : m.from_uuid} ${time}`));
    li.append(el('span', 'body', describe(m)));
    if (mine && m.status === 0 && m.msg_type < 100 && Date.now() - m.send_time < RECALL_WINDOW_MS) {
      const b = el('button', 'recall', 'recall');
      b.onclick = () => recall(m).catch(alertError);
      li.append(b);
    }
    box.append(li);
  }
}

function alertError(e) {
  setStatus(`error: ${e.message}`, $('status').dataset.state === 'connected' ? 'connected' : 'reconnecting');
}

// ---- start ---------------------------------------------------------------

function signIn(token) {
  let claims;
  try {
    claims = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
  } catch (e) {
    setStatus('not a token', 'signed-out');
    return;
  }
  state.token = token;
  state.me = claims.sub;
  $('me').textContent = `${claims.sub} (${claims.did})`;
  $('signin').hidden = true;
  $('app').hidden = false;
  setStatus('connecting', 'reconnecting');
  connect();
}

$('signin-btn').onclick = () => signIn($('token').value.trim());
$('composer').onsubmit = (ev) => {
  ev.preventDefault();
  const text = $('text').value.trim();
  if (!text || !state.open) return;
  $('text').value = '';
  send(text).catch(alertError);
};
$('new-chat').onsubmit = (ev) => {
  ev.preventDefault();
  const peer = $('new-peer').value.trim();
  if (!peer || peer === state.me) return;
  $('new-peer').value = '';
  const [a, b] = [state.me, peer].sort();
  const convId = `p2p-${a}-${b}`;
  if (!state.convs.has(convId)) {
    state.convs.set(convId, normConv({ conv_id: convId, updated_at: Date.now() }));
  }
  openConv(convId).catch(alertError);
};
$('new-group').onsubmit = (ev) => {
  ev.preventDefault();
  const members = $('group-members').value.split(',').map((s) => s.trim()).filter(Boolean);
  const name = $('group-name').value.trim();
  // A readable group id (ids are [A-Za-z0-9_.@]): the name plus a few random letters.
  const slug = name.replace(/[^A-Za-z0-9_.@]/g, '_').slice(0, 40) || 'group';
  const groupId = `${slug}_${Math.random().toString(36).slice(2, 6)}`;
  call('create_group', { group_id: groupId, name, members })
    .then(async (r) => {
      $('group-name').value = $('group-members').value = '';
      await loadConversations();
      await openConv(r.conv_id);
    })
    .catch(alertError);
};
$('older').onclick = () => loadOlder(state.open).then(render, alertError);
$('messages').onscroll = () => {
  if ($('messages').scrollTop === 0 && state.open && state.hasOlder.get(state.open)) {
    const box = $('messages');
    const before = box.scrollHeight;
    loadOlder(state.open).then(() => { render(); box.scrollTop = box.scrollHeight - before; }, alertError);
  }
};
document.addEventListener('visibilitychange', () => { markOpenRead(); render(); });
setInterval(() => call('heartbeat', {}).catch(() => {}), 30000);

const fromLink = new URLSearchParams(location.hash.slice(1)).get('token');
if (fromLink) signIn(fromLink);
