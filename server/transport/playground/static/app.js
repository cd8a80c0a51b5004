// The playground: a Socket.IO client of this service (docs/protocol.md) in plain JavaScript.
// Every text the page shows (messages, model output, tool arguments and results) goes in as text,
// never as HTML.
import { io } from "./vendor/socket.io.esm.min.js";

const TOKEN_KEY = "playground.token";
const ACK_TIMEOUT_MS = 15000;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  sessionId: $("session-id"),
  copyLink: $("copy-link"),
  presence: $("presence"),
  log: $("log"),
  empty: $("empty"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  notice: $("notice"),
  tokenForm: $("token-form"),
  token: $("token"),
  tokenError: $("token-error"),
};

// What a person reads for each refusal code (docs/protocol.md, Errors); the server's message follows.
const REFUSALS = {
  busy: "The assistant is still answering in this session. Wait for it to finish, or press Stop.",
  message_too_long: "That message is longer than this service accepts.",
  rate_limited: "Too many messages in a short time. Wait a moment, then send again.",
  empty_message: "Type a message first.",
  unavailable: "The service cannot store messages right now; nothing was sent. Try again in a moment.",
  no_active_turn: "There is no answer to stop.",
  not_joined: "This tab is not in the session yet; wait for it to reconnect.",
  forbidden: "This session belongs to another user.",
  invalid_session_id: "The session in this page's address is not a valid session id.",
  unauthorized: "The access token was refused (missing, invalid or expired).",
  invalid_payload: "The service could not read that request.",
  timeout: "The service did not answer in time; your message may not have been sent.",
  unreachable: "Still trying to connect. Is the service running, and is this page's origin ({origin}) in its CORS_ORIGINS?",
};

const FINISHED = {
  stop: "finished (stop)",
  cancelled: "stopped (cancelled)",
  max_tokens: "cut short: the answer reached its token limit (max_tokens)",
  safety: "withheld by the model's safety filter (safety)",
  error: "failed (error)",
};

const state = {
  sessionId: new URLSearchParams(location.search).get("session"),
  lastEventId: null, // the highest stored event id shown: a rejoin asks only for what came after
  seenEvents: new Set(),
  tools: new Map(), // call_id -> its view
  turns: new Map(), // turn_id -> its view
  openTurn: null, // the answer being written (live, or rebuilt from history)
  runningTurn: null, // turn_id of the session's running turn
  unconfirmedDone: 0, // answers whose `done` came with event_id null: their rows come later in history
  joining: false,
  buffered: [], // events that arrive while a join is answered, handled after its history
  failedAttempts: 0, // connection attempts failed in a row
};

const socket = io({
  transports: ["websocket", "polling"],
  tryAllTransports: true,
  auth: (send) => {
    const token = sessionStorage.getItem(TOKEN_KEY);
    send(token ? { token } : {});
  },
});

// ---------- rendering (text only) ----------

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function show(element) {
  const follow = nearBottom();
  ui.empty.hidden = true;
  ui.log.append(element);
  if (follow) ui.log.scrollTop = ui.log.scrollHeight;
  return element;
}

function keepScrolled(follow) {
  if (follow) ui.log.scrollTop = ui.log.scrollHeight;
}

function showUserMessage(text) {
  const article = node("article", "msg user");
  article.append(node("h2", "who", "You"), node("p", "text", text));
  show(article);
}

function newTurn(turnId) {
  const article = node("article", "msg ai");
  const body = node("div", "body");
  const finish = node("p", "finish", "answering…");
  article.append(node("h2", "who", "Assistant"), body, finish);
  if (turnId) article.dataset.turn = turnId;
  show(article);
  const turn = { id: turnId, article, body, finish, segment: null, text: "", nextIndex: 0, finished: false };
  if (turnId) state.turns.set(turnId, turn);
  state.openTurn = turn;
  return turn;
}

function liveTurn(turnId) {
  return state.turns.get(turnId) ?? newTurn(turnId);
}

function appendText(turn, text) {
  if (!text) return;
  const follow = nearBottom();
  if (!turn.segment) {
    turn.segment = node("p", "text");
    turn.body.append(turn.segment);
  }
  turn.segment.append(text);
  turn.text += text;
  keepScrolled(follow);
}

function replaceText(turn, text) {
  for (const segment of turn.body.querySelectorAll(":scope > p.text")) segment.remove();
  turn.segment = null;
  turn.text = "";
  appendText(turn, text);
}

// The text a turn should show, given what it shows already: the rest is appended where possible.
function catchUpText(turn, text) {
  if (text.startsWith(turn.text)) appendText(turn, text.slice(turn.text.length));
  else replaceText(turn, text);
}

function finishTurn(turn, { finish_reason, error, usage }) {
  turn.finished = true;
  if (state.openTurn === turn) state.openTurn = null;
  turn.article.dataset.finish = finish_reason ?? "unknown";
  let words = finish_reason ? (FINISHED[finish_reason] ?? finish_reason) : "stored answer";
  if (error) words += `: ${error.message} (${error.code})`;
  if (usage) words += ` · ${usage.input_tokens} tokens in, ${usage.output_tokens} out`;
  turn.finish.textContent = words;
  if (turn.id && state.runningTurn === turn.id) setRunning(null);
}

function prettyJson(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function showToolCall(turn, { call_id, name, args }) {
  const follow = nearBottom();
  const details = node("details", "tool");
  const summary = node("summary");
  const status = node("span", "tool-status", "running…");
  summary.append(node("span", "tool-name", name), node("span", "tool-args", oneLine(args)), status);
  const argsBlock = node("pre", "tool-json", prettyJson(args));
  const resultBlock = node("div", "tool-result");
  details.append(summary, node("h3", null, "Arguments"), argsBlock, resultBlock);
  turn.body.append(details);
  turn.segment = null; // text after a call goes after it
  const view = { details, status, resultBlock };
  state.tools.set(call_id, view);
  keepScrolled(follow);
  return view;
}

function oneLine(args) {
  const text = JSON.stringify(args ?? {});
  return text.length > 80 ? `${text.slice(0, 79)}…` : text;
}

function showToolResult(view, { result, error }) {
  view.resultBlock.replaceChildren();
  if (error) {
    view.details.dataset.outcome = "error";
    view.status.textContent = `error: ${error.code}`;
    view.resultBlock.append(node("h3", null, "Error"), node("p", "tool-error", `${error.message} (${error.code})`));
  } else {
    view.details.dataset.outcome = "ok";
    view.status.textContent = "done";
    view.resultBlock.append(node("h3", null, "Result"), node("pre", "tool-json", prettyJson(result)));
  }
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
}

function setRunning(turnId) {
  state.runningTurn = turnId;
  ui.stop.hidden = !turnId;
  ui.log.setAttribute("aria-busy", turnId ? "true" : "false");
}

function showSession(sessionId) {
  state.sessionId = sessionId;
  ui.sessionId.textContent = sessionId;
  ui.copyLink.disabled = false;
  const url = `/?session=${encodeURIComponent(sessionId)}`;
  if (location.pathname + location.search !== url) history.replaceState(null, "", url);
}

// ---------- stored history (a join's answer) ----------

function markStored(eventId) {
  if (eventId === null || eventId === undefined) return true;
  if (state.seenEvents.has(eventId)) return false;
  state.seenEvents.add(eventId);
  state.lastEventId = Math.max(state.lastEventId ?? 0, eventId);
  return true;
}

function parseContent(item) {
  try {
    const value = JSON.parse(item.content);
    if (value && typeof value === "object" && !Array.isArray(value)) return value;
  } catch {
    // rows written by other SQL may hold any text: shown as it is
  }
  return { call_id: `row-${item.event_id}`, name: item.event_type, args: item.content, result: item.content };
}

function showStored(item) {
  if (!markStored(item.event_id)) return;
  switch (item.event_type) {
    case "user_message":
      showUserMessage(item.content);
      newTurn(null);
      break;
    case "tool_call": {
      const call = parseContent(item);
      if (!state.tools.has(call.call_id)) showToolCall(state.openTurn ?? newTurn(null), call);
      break;
    }
    case "tool_result": {
      const outcome = parseContent(item);
      const view = state.tools.get(outcome.call_id) ?? showToolCall(state.openTurn ?? newTurn(null), outcome);
      showToolResult(view, outcome);
      break;
    }
    case "ai_message":
      showStoredAnswer(item);
      break;
  }
}

function showStoredAnswer(item) {
  const turn = state.openTurn;
  if (!turn && state.unconfirmedDone > 0) {
    state.unconfirmedDone -= 1; // shown live already, stored since
    return;
  }
  const target = turn ?? newTurn(null);
  catchUpText(target, item.content);
  finishTurn(target, { finish_reason: item.finish_reason, error: item.error, usage: null });
}

function catchUp(history, activeTurn) {
  for (const item of history) showStored(item);
  if (activeTurn) {
    let turn = state.turns.get(activeTurn.turn_id);
    if (!turn && state.openTurn && !state.openTurn.id) {
      turn = state.openTurn; // its user message came with the history
      turn.id = activeTurn.turn_id;
      turn.article.dataset.turn = turn.id;
      state.turns.set(turn.id, turn);
    }
    turn ??= newTurn(activeTurn.turn_id);
    catchUpText(turn, activeTurn.text);
    turn.nextIndex = activeTurn.next_index ?? 0;
    setRunning(turn.id);
  } else if (state.openTurn) {
    // No turn runs and no answer is stored for it (yet): it ended while this tab was away.
    const turn = state.openTurn;
    finishTurn(turn, { finish_reason: null, error: null, usage: null });
    turn.finish.textContent = "no answer stored for this message yet; reload later to see it";
  }
}

// ---------- live events ----------

const handlers = {
  user_message(event) {
    if (event.event_id !== null && state.seenEvents.has(event.event_id)) return;
    markStored(event.event_id);
    showUserMessage(event.text);
    newTurn(event.turn_id);
    setRunning(event.turn_id);
  },
  chunk(event) {
    const turn = liveTurn(event.turn_id);
    if (turn.finished || event.index < turn.nextIndex) return; // already in active_turn.text
    appendText(turn, event.text);
    turn.nextIndex = event.index + 1;
  },
  tool_call(event) {
    if (!state.tools.has(event.call_id)) showToolCall(liveTurn(event.turn_id), event);
  },
  tool_result(event) {
    const view = state.tools.get(event.call_id) ?? showToolCall(liveTurn(event.turn_id), event);
    showToolResult(view, event);
  },
  done(event) {
    const turn = liveTurn(event.turn_id);
    if (turn.finished) return;
    if (turn.text !== event.text) replaceText(turn, event.text);
    finishTurn(turn, event);
    if (event.event_id === null) state.unconfirmedDone += 1;
    else markStored(event.event_id);
  },
  presence(event) {
    ui.presence.textContent = `${event.clients} tab${event.clients === 1 ? "" : "s"} in this session`;
  },
};

for (const [name, handle] of Object.entries(handlers)) {
  socket.on(name, (event) => {
    if (state.joining) state.buffered.push([handle, event]); // a new session's id is not known yet
    else if (event?.session_id === state.sessionId) handle(event);
  });
}

// ---------- requests ----------

async function request(name, payload) {
  try {
    return await socket.timeout(ACK_TIMEOUT_MS).emitWithAck(name, payload);
  } catch {
    return { ok: false, error: { code: "timeout", message: "" } };
  }
}

async function join() {
  const payload = {};
  if (state.sessionId) payload.session_id = state.sessionId;
  if (state.lastEventId !== null) payload.after_event_id = state.lastEventId;
  state.joining = true;
  const answer = await request("join", payload);
  state.joining = false;
  const buffered = state.buffered.splice(0);
  if (!answer.ok) {
    setNotice(ui.notice, refusalText(answer.error));
    setStatus("refused", "Not in a session");
    if (answer.error.code === "unauthorized") askForToken(true);
    return;
  }
  showSession(answer.session.session_id);
  catchUp(answer.history, answer.active_turn);
  for (const [handle, event] of buffered) if (event?.session_id === state.sessionId) handle(event);
  setStatus("connected", "Connected");
  setNotice(ui.notice, null);
}

async function send() {
  const text = ui.message.value;
  if (!text.trim()) {
    setNotice(ui.notice, REFUSALS.empty_message);
    return;
  }
  ui.send.disabled = true;
  const answer = await request("message", { session_id: state.sessionId, text, client_message_id: newId() });
  ui.send.disabled = !socket.connected;
  if (answer.ok) {
    if (ui.message.value === text) ui.message.value = "";
    setNotice(ui.notice, null);
  } else {
    setNotice(ui.notice, refusalText(answer.error));
    if (answer.error.code === "unauthorized") askForToken(true);
  }
}

async function stop() {
  const answer = await request("cancel", { session_id: state.sessionId });
  if (!answer.ok) setNotice(ui.notice, refusalText(answer.error));
}

// crypto.randomUUID needs a secure context; the page may be opened over plain http on a LAN address.
function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `pg-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// ---------- connection ----------

function askForToken(refused) {
  if (refused) sessionStorage.removeItem(TOKEN_KEY);
  ui.tokenForm.hidden = false;
  setNotice(ui.tokenError, refused ? `unauthorized: ${REFUSALS.unauthorized}` : null);
  ui.token.focus();
}

socket.on("connect", () => {
  state.failedAttempts = 0;
  ui.tokenForm.hidden = true;
  setStatus("joining", "Joining…");
  join();
});

socket.on("disconnect", (reason) => {
  setStatus("reconnecting", "Reconnecting…");
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
    askForToken(Boolean(sessionStorage.getItem(TOKEN_KEY)));
  } else {
    setNotice(ui.notice, refusalText({ code: error.message, message: "" }));
  }
});

// ---------- controls ----------

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
  if (event.key === "Escape" && state.runningTurn && !ui.stop.disabled) stop();
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
  const token = ui.token.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  ui.token.value = "";
  setNotice(ui.tokenError, null);
  setStatus("connecting", "Connecting…");
  socket.disconnect().connect();
});
