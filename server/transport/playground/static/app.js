// The playground: a Socket.IO client of this service (docs/protocol.md) in plain JavaScript, with
// the user's chats beside the conversation (sessions.js) and the conversation itself
// (conversation.js). Every text the page shows goes in as text, never as HTML, but for answers'
// Markdown, which markdown.js renders with raw HTML off.
import { io } from "./vendor/socket.io.esm.min.js";
import { anonymousOwner, api, randomHex, sessionPath, token } from "./api.js";
import { setUpApprovals } from "./approvals.js";
import { clearAttachments, readyAttachments, sentAttachments, setAttachUsable, setUpAttachments } from "./attachments.js";
import {
  catchUpTurn,
  clearConversation,
  liveHandlers,
  setEarlierAvailable,
  showAtEnd,
  showEarlier,
  showHistory,
  shown,
} from "./conversation.js";
import { copyCode } from "./markdown.js";
import {
  displayTitle,
  reloadSessions,
  sessionRemoved,
  sessionTouched,
  sessionUpdated,
  setCurrentSession,
  setUpSessionList,
} from "./sessions.js";

const ACK_TIMEOUT_MS = 15000;
const EARLIER_PAGE = 100;
const LATER_PAGE = 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  chatTitle: $("chat-title"),
  sessionId: $("session-id"),
  copyLink: $("copy-link"),
  presence: $("presence"),
  log: $("log"),
  loadEarlier: $("load-earlier"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  notice: $("notice"),
  tokenForm: $("token-form"),
  token: $("token"),
  tokenError: $("token-error"),
  newChat: $("new-chat"),
  openDrawer: $("open-drawer"),
  closeDrawer: $("close-drawer"),
  backdrop: $("backdrop"),
  sidebar: $("sidebar"),
};

// What a person reads for each refusal code (docs/protocol.md, Errors); the server's message follows.
const REFUSALS = {
  busy: "The assistant is still answering in this session. Wait for it to finish, or press Stop.",
  message_too_long: "That message is longer than this service accepts.",
  rate_limited: "Too many messages in a short time. Wait a moment, then send again.",
  empty_message: "Type a message first.",
  uploading: "A file is still uploading: send once it is done, or remove it.",
  unavailable: "The service cannot store messages right now; nothing was sent. Try again in a moment.",
  no_active_turn: "There is no answer to stop.",
  no_pending_approval: "Already decided (in another tab or by another client), timed out, or the answer was stopped.",
  not_joined: "This tab is not in the session yet; wait for it to reconnect.",
  forbidden: "This session belongs to another user.",
  invalid_session_id: "The session in this page's address is not a valid session id.",
  session_deleted: "This chat was deleted; it cannot be opened or continued.",
  unauthorized: "The access token was refused (missing, invalid or expired).",
  invalid_payload: "The service could not read that request.",
  timeout: "The service did not answer in time; your message may not have been sent.",
  unreachable: "Still trying to connect. Is the service running, and is this page's origin ({origin}) in its CORS_ORIGINS?",
};

const state = {
  sessionId: new URLSearchParams(location.search).get("session"),
  session: null, // the joined session as the join answered it (title, start_time)
  gone: false, // the open session was deleted
  generation: 0, // bumped by every join: the answer of one superseded meanwhile is dropped
  joining: false,
  buffered: [], // events that arrive while a join is answered, handled after its history
  failedAttempts: 0, // connection attempts failed in a row
};

const socket = io({
  transports: ["websocket", "polling"],
  tryAllTransports: true,
  auth: (send) => {
    const bearer = token.get();
    send(bearer ? { token: bearer } : {});
  },
});

// ---------- what the page says ----------

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function setNotice(element, text) {
  element.textContent = text ?? "";
  element.hidden = !text;
}

function refusalText(error) {
  const words = REFUSALS[error.code];
  if (!words) return `${error.message} (${error.code})`;
  return error.message && error.code !== "timeout" ? `${words} ${error.message} (${error.code})` : words;
}

function setStatus(stateName, text) {
  ui.status.dataset.state = stateName;
  ui.status.textContent = text;
  const usable = stateName === "connected";
  ui.message.disabled = !usable;
  ui.send.disabled = !usable;
  ui.stop.disabled = !usable;
  setAttachUsable(usable);
}

shown.onRunning = (turnId) => {
  ui.stop.hidden = !turnId;
  ui.log.setAttribute("aria-busy", turnId ? "true" : "false");
};

function showSession(session) {
  state.sessionId = session.session_id;
  state.session = session;
  ui.sessionId.textContent = session.session_id;
  ui.chatTitle.textContent = displayTitle(session);
  ui.copyLink.disabled = false;
  setCurrentSession(session.session_id);
  const url = `/?session=${encodeURIComponent(session.session_id)}`;
  if (location.pathname + location.search !== url) history.replaceState(null, "", url);
}

// The open session was deleted (here, in another tab, by another client): say so, offer a new one.
function showGone(text) {
  state.gone = true;
  shown.onRunning(null);
  setStatus("deleted", "Chat deleted");
  const box = node("div", "gone");
  box.setAttribute("role", "alert");
  const again = node("button", "new-chat-inline", "Start a new chat");
  again.type = "button";
  again.addEventListener("click", () => openSession(null));
  box.append(node("p", null, text), again);
  showAtEnd(box);
}

// ---------- events ----------

const roomHandlers = {
  ...liveHandlers,
  user_message(event) {
    liveHandlers.user_message(event);
    if (state.session) sessionTouched(state.session);
  },
  presence(event) {
    ui.presence.textContent = `${event.clients} tab${event.clients === 1 ? "" : "s"} in this session`;
  },
};

for (const [name, handle] of Object.entries(roomHandlers)) {
  socket.on(name, (event) => {
    if (state.joining) state.buffered.push([handle, event]); // a new session's id is not known yet
    else if (event?.session_id === state.sessionId) handle(event);
  });
}

// These come for every session of the user, joined or not: the list follows them all.
socket.on("session_updated", (event) => {
  sessionUpdated(event);
  if (event.session_id === state.sessionId && state.session) {
    state.session = { ...state.session, title: event.title, updated_at: event.updated_at };
    ui.chatTitle.textContent = displayTitle(state.session);
  }
});

socket.on("session_deleted", (event) => {
  sessionRemoved(event.session_id);
  if (event.session_id === state.sessionId && !state.gone) {
    showGone("This chat was deleted (in this tab, another tab or by another client); it cannot be continued.");
  }
});

// ---------- requests ----------

async function request(name, payload) {
  try {
    return await socket.timeout(ACK_TIMEOUT_MS).emitWithAck(name, payload);
  } catch {
    return { ok: false, error: { code: "timeout", message: "" } };
  }
}

// Stored events after the last one shown, a page at a time, until none is left.
async function showLaterPages(sessionId, generation) {
  let more = true;
  while (more && generation === state.generation) {
    const page = await api(`${sessionPath(sessionId)}/events`, {
      query: { after_event_id: shown.lastEventId, limit: LATER_PAGE },
    });
    if (generation !== state.generation) return;
    showHistory(page.events);
    more = page.more && page.events.length > 0;
  }
}

// Back after a disconnection (the socket is in no room): what was stored meanwhile comes first, so
// that the join's answer (its history, `active_turn`) and the live events after it start where
// these pages end. Without this, a rejoin answering `history_more` would leave events in between.
async function catchUpStored(generation) {
  try {
    await showLaterPages(state.sessionId, generation);
    return true;
  } catch (error) {
    // A deleted session is the join's to say (it offers a new chat).
    if (error.code !== "session_deleted") setNotice(ui.notice, `Could not load what was missed: ${error.message} (${error.code})`);
    return false;
  }
}

function joinPayload() {
  const payload = { ...anonymousOwner() };
  if (state.sessionId) payload.session_id = state.sessionId;
  if (shown.lastEventId !== null) payload.after_event_id = shown.lastEventId;
  return payload;
}

async function join() {
  const generation = ++state.generation;
  const rejoin = shown.lastEventId !== null;
  state.joining = true;
  let complete = !rejoin || (await catchUpStored(generation));
  if (generation !== state.generation) return;
  const answer = await request("join", joinPayload());
  if (generation !== state.generation) {
    // Another session was chosen meanwhile: this one's room is not wanted.
    if (answer.ok && answer.session.session_id !== state.sessionId) leave(answer.session.session_id);
    return;
  }
  if (!answer.ok) {
    state.joining = false;
    state.buffered = [];
    refused(answer.error);
    return;
  }
  showSession(answer.session);
  showHistory(answer.history);
  if (!rejoin) setEarlierAvailable(answer.history_more);
  // More than a page stored between those pages and the join: rare, and fetched the same way.
  else if (answer.history_more) complete = (await catchUpStored(generation)) && complete;
  if (generation !== state.generation) return;
  catchUpTurn(answer.active_turn);
  state.joining = false;
  for (const [handle, event] of state.buffered.splice(0)) if (event?.session_id === state.sessionId) handle(event);
  setStatus("connected", "Connected");
  if (complete) setNotice(ui.notice, null);
}

function refused(error) {
  if (error.code === "session_deleted") {
    showGone(refusalText(error));
    return;
  }
  setNotice(ui.notice, refusalText(error));
  setStatus("refused", "Not in a session");
  if (error.code === "unauthorized") askForToken(true);
}

function leave(sessionId) {
  if (socket.connected) socket.emit("leave", { session_id: sessionId });
}

/** Show another session (null: a new one): leave the open one, join that one. */
function openSession(sessionId, { push = true } = {}) {
  closeDrawer();
  if (sessionId && sessionId === state.sessionId && !state.gone) return;
  if (state.session && !state.gone) leave(state.session.session_id);
  clearConversation();
  clearAttachments();
  Object.assign(state, { sessionId, session: null, gone: false, buffered: [] });
  ui.presence.textContent = "";
  ui.chatTitle.textContent = "New chat";
  ui.sessionId.textContent = sessionId ?? "not joined yet";
  setCurrentSession(sessionId);
  setNotice(ui.notice, null);
  if (push) history.pushState(null, "", sessionId ? `/?session=${encodeURIComponent(sessionId)}` : "/");
  if (!socket.connected) return; // joined on connect
  setStatus("joining", "Joining…");
  join();
}

async function loadEarlier() {
  const sessionId = state.sessionId;
  ui.loadEarlier.disabled = true;
  try {
    const page = await api(`${sessionPath(sessionId)}/events`, {
      query: { before_event_id: shown.firstEventId, limit: EARLIER_PAGE },
    });
    if (sessionId !== state.sessionId) return;
    showEarlier(page.events);
    setEarlierAvailable(page.more);
  } catch (error) {
    ui.loadEarlier.disabled = false;
    setNotice(ui.notice, `Could not load earlier messages: ${error.message} (${error.code})`);
  }
}

async function send() {
  const text = ui.message.value;
  const attachments = readyAttachments();
  if (attachments === null) {
    setNotice(ui.notice, REFUSALS.uploading);
    return;
  }
  // With files the text may be empty: whether that is enough is the service's to say.
  if (!text.trim() && attachments.length === 0) {
    setNotice(ui.notice, REFUSALS.empty_message);
    return;
  }
  ui.send.disabled = true;
  const payload = { session_id: state.sessionId, text, client_message_id: `pg-${randomHex(16)}` };
  if (attachments.length) payload.attachments = attachments;
  const answer = await request("message", payload);
  ui.send.disabled = !socket.connected || state.gone;
  if (answer.ok) {
    if (ui.message.value === text) ui.message.value = "";
    sentAttachments(attachments);
    setNotice(ui.notice, null);
  } else if (answer.error.code === "session_deleted") {
    if (!state.gone) showGone(refusalText(answer.error));
  } else {
    setNotice(ui.notice, refusalText(answer.error));
    if (answer.error.code === "unauthorized") askForToken(true);
  }
}

/** Approve or deny a tool call waiting in the open session (`reason`: null for none). */
function decideToolCall(callId, approved, reason) {
  const payload = { session_id: state.sessionId, call_id: callId, approved };
  if (reason) payload.reason = reason;
  return request("approve_tool", payload);
}

async function stop() {
  const answer = await request("cancel", { session_id: state.sessionId });
  if (!answer.ok) setNotice(ui.notice, refusalText(answer.error));
}

// ---------- connection ----------

function askForToken(refused) {
  if (refused) token.clear();
  ui.tokenForm.hidden = false;
  setNotice(ui.tokenError, refused ? `unauthorized: ${REFUSALS.unauthorized}` : null);
  ui.token.focus();
}

socket.on("connect", async () => {
  state.failedAttempts = 0;
  ui.tokenForm.hidden = true;
  if (state.gone) setStatus("deleted", "Chat deleted");
  else {
    setStatus("joining", "Joining…");
    await join();
  }
  // Events about the user's chats may have been missed while away: the list starts again.
  reloadSessions();
});

socket.on("disconnect", (reason) => {
  if (!state.gone) setStatus("reconnecting", "Reconnecting…");
  if (reason === "io server disconnect") socket.connect(); // the server closed it: come back anyway
});

socket.io.on("reconnect_attempt", (attempt) => setStatus("reconnecting", `Reconnecting… (attempt ${attempt})`));

socket.on("connect_error", (error) => {
  if (socket.active) {
    state.failedAttempts += 1;
    setStatus("reconnecting", "Cannot reach the service; retrying…");
    // A refused origin looks like any failed handshake to a browser: say what to check.
    if (state.failedAttempts === 2) setNotice(ui.notice, REFUSALS.unreachable.replace("{origin}", location.origin));
    return;
  }
  // Refused by the server: it will not retry by itself.
  setStatus("refused", "Not connected");
  if (error.message === "unauthorized") {
    askForToken(Boolean(token.get()));
  } else {
    setNotice(ui.notice, refusalText({ code: error.message, message: "" }));
  }
});

// ---------- the drawer (the list on a phone) ----------

function setDrawer(open) {
  document.body.classList.toggle("drawer-open", open);
  ui.openDrawer.setAttribute("aria-expanded", String(open));
  ui.backdrop.hidden = !open;
}

function closeDrawer() {
  if (!document.body.classList.contains("drawer-open")) return;
  setDrawer(false);
  ui.openDrawer.focus();
}

ui.openDrawer.addEventListener("click", () => {
  setDrawer(true);
  ui.newChat.focus();
});
ui.closeDrawer.addEventListener("click", closeDrawer);
ui.backdrop.addEventListener("click", closeDrawer);

// ---------- controls ----------

setUpSessionList({ open: (sessionId) => openSession(sessionId) });
setUpApprovals({ decide: decideToolCall, describeRefusal: refusalText });
setUpAttachments({
  sessionId: () => (state.gone || state.joining ? null : state.sessionId),
  usable: () => ui.status.dataset.state === "connected",
});
ui.newChat.addEventListener("click", () => openSession(null));
ui.loadEarlier.addEventListener("click", loadEarlier);
window.addEventListener("popstate", () => openSession(new URLSearchParams(location.search).get("session"), { push: false }));

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!ui.send.disabled) ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", stop);

document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (document.body.classList.contains("drawer-open")) closeDrawer();
  else if (shown.runningTurn && !ui.stop.disabled) stop();
});

ui.log.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy-code");
  if (button) copyCode(button);
});

ui.copyLink.addEventListener("click", async () => {
  const link = location.href;
  try {
    await navigator.clipboard.writeText(link);
    ui.copyLink.textContent = "Copied";
  } catch {
    // No clipboard outside a secure context: show the link to copy by hand.
    window.prompt("Copy this link:", link);
  }
  setTimeout(() => (ui.copyLink.textContent = "Copy link"), 1500);
});

ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const value = ui.token.value.trim();
  if (!value) return;
  token.set(value);
  ui.token.value = "";
  setNotice(ui.tokenError, null);
  setStatus("connecting", "Connecting…");
  socket.disconnect().connect();
});
