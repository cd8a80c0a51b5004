// The conversation as the log shows it: messages, answers (Markdown, see markdown.js), tool calls,
// built from live events and from stored history, a page of earlier events put before the rest.
// Every text other than an answer's Markdown goes in as text, never as HTML; user messages stay
// plain text. Calls waiting for a person's approval get their controls from approvals.js.
import {
  awaitDecision,
  clearApprovals,
  decided,
  endWaitingIn,
  markRequired,
  settleWithResult,
  stopWaitingExcept,
} from "./approvals.js";
import { attachmentList } from "./attachments.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = { log: $("log"), empty: $("empty"), loadEarlier: $("load-earlier") };

const FINISHED = {
  stop: "finished (stop)",
  cancelled: "stopped (cancelled)",
  max_tokens: "cut short: the answer reached its token limit (max_tokens)",
  safety: "withheld by the model's safety filter (safety)",
  error: "failed (error)",
};

export const shown = {
  lastEventId: null, // the highest stored event id shown: a rejoin asks only for what came after
  firstEventId: null, // the lowest: "load earlier messages" asks for what came before
  seenEvents: new Set(),
  // Results shown before their call (the call is on an earlier page): call_id -> its view. Every
  // other call is found in its turn's `tools`: a model that sends no ids repeats `call-1` each turn.
  resultsFirst: new Map(),
  turns: new Map(), // turn_id -> its view
  runningTurn: null, // turn_id of the session's running turn
  unconfirmedDone: 0, // answers whose `done` came with event_id null: their rows come later in history
  onRunning: () => {}, // told when the running turn changes (the Stop button)
};

// Where events are drawn: the log itself, or a fragment of earlier events to put before it.
const live = { into: ui.log, openTurn: null };

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

export function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function keepScrolled(follow) {
  if (follow) ui.log.scrollTop = ui.log.scrollHeight;
}

function show(element, view) {
  if (view.into !== ui.log) {
    view.into.append(element);
    return element;
  }
  const follow = nearBottom();
  ui.empty.hidden = true;
  ui.log.append(element);
  keepScrolled(follow);
  return element;
}

/** Append an element at the end of the log (following it when the reader is at the end). */
export function showAtEnd(element) {
  return show(element, live);
}

function showUserMessage(text, attachments, view) {
  const article = node("article", "msg user");
  article.append(node("h2", "who", "You"), node("p", "text", text));
  const files = attachmentList(attachments);
  if (files) article.append(files);
  show(article, view);
}

// `continued`: an answer whose question is on an earlier page, not loaded yet.
function newTurn(turnId, view, continued = false) {
  const article = node("article", "msg ai");
  const body = node("div", "body");
  const finish = node("p", "finish", "answering…");
  article.append(node("h2", "who", "Assistant"), body, finish);
  if (turnId) article.dataset.turn = turnId;
  if (continued) article.dataset.continued = "true";
  show(article, view);
  const turn = {
    ...{ id: turnId, article, body, finish, segment: null, text: "", nextIndex: 0, finished: false },
    tools: new Map(), // call_id -> its view
  };
  if (turnId) shown.turns.set(turnId, turn);
  view.openTurn = turn;
  return turn;
}

function liveTurn(turnId) {
  return shown.turns.get(turnId) ?? newTurn(turnId, live);
}

// ---------- answers' text, as Markdown ----------

const dirty = new Set(); // segments whose source changed since they were drawn
let frameAsked = false;

function draw(segment) {
  dirty.delete(segment);
  segment.element.replaceChildren(renderMarkdown(segment.source));
}

// A streamed answer is drawn again at most once a frame, however fast its chunks come.
function drawDirty() {
  frameAsked = false;
  const follow = nearBottom();
  for (const segment of Array.from(dirty)) draw(segment);
  keepScrolled(follow);
}

function appendText(turn, text) {
  if (!text) return;
  if (!turn.segment) {
    turn.segment = { element: node("div", "text markdown"), source: "" };
    turn.body.append(turn.segment.element);
  }
  turn.segment.source += text;
  turn.text += text;
  dirty.add(turn.segment);
  if (!frameAsked) {
    frameAsked = true;
    requestAnimationFrame(drawDirty);
  }
}

function replaceText(turn, text) {
  for (const element of turn.body.querySelectorAll(":scope > .text")) element.remove();
  for (const segment of Array.from(dirty)) if (!segment.element.isConnected) dirty.delete(segment);
  turn.segment = null;
  turn.text = "";
  appendText(turn, text);
}

// The text a turn should show, given what it shows already: the rest is appended where possible.
function catchUpText(turn, text) {
  if (text.startsWith(turn.text)) appendText(turn, text.slice(turn.text.length));
  else replaceText(turn, text);
}

function finishTurn(turn, { finish_reason, error, usage }, view = live) {
  const follow = turn.article.isConnected && nearBottom();
  for (const segment of Array.from(dirty)) if (turn.body.contains(segment.element)) draw(segment);
  keepScrolled(follow);
  turn.finished = true;
  if (view.openTurn === turn) view.openTurn = null;
  turn.article.dataset.finish = finish_reason ?? "unknown";
  let words = finish_reason ? (FINISHED[finish_reason] ?? finish_reason) : "stored answer";
  if (error) words += `: ${error.message} (${error.code})`;
  if (usage) words += ` · ${usage.input_tokens} tokens in, ${usage.output_tokens} out`;
  turn.finish.textContent = words;
  endWaitingIn(turn.article);
  if (turn.id && shown.runningTurn === turn.id) setRunning(null);
}

export function setRunning(turnId) {
  shown.runningTurn = turnId;
  shown.onRunning(turnId);
}

// ---------- tool calls ----------

function prettyJson(value) {
  return typeof value === "string" ? value : JSON.stringify(value ?? null, null, 2);
}

function oneLine(args) {
  const text = JSON.stringify(args ?? {});
  return text.length > 80 ? `${text.slice(0, 79)}…` : text;
}

function showToolCall(turn, { call_id, name, args }) {
  const follow = turn.article.isConnected && nearBottom();
  const details = node("details", "tool");
  const summary = node("summary");
  const status = node("span", "tool-status", "running…");
  // No args: a result whose call is on an earlier page, not loaded yet.
  const argsLine = node("span", "tool-args", args === undefined ? "" : oneLine(args));
  summary.append(node("span", "tool-name", name), argsLine, status);
  const argsBlock = node("pre", "tool-json", args === undefined ? "(on an earlier page)" : prettyJson(args));
  const resultBlock = node("div", "tool-result");
  details.append(summary, node("h3", null, "Arguments"), argsBlock, resultBlock);
  turn.body.append(details);
  turn.segment = null; // text after a call goes after it
  const view = { callId: call_id, details, status, argsLine, argsBlock, resultBlock };
  turn.tools.set(call_id, view);
  if (args === undefined) shown.resultsFirst.set(call_id, view);
  keepScrolled(follow);
  return view;
}

// A call whose result was shown first: its result was on a later page than the call.
function fillToolArgs(view, { args }) {
  view.argsLine.textContent = oneLine(args);
  view.argsBlock.textContent = prettyJson(args);
}

function showToolResult(view, { result, error, approval }) {
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
  settleWithResult(view, { error, approval });
}

// ---------- stored history (a join's answer, a page of events) ----------

function markStored(eventId) {
  if (eventId === null || eventId === undefined) return true;
  if (shown.seenEvents.has(eventId)) return false;
  shown.seenEvents.add(eventId);
  shown.lastEventId = Math.max(shown.lastEventId ?? eventId, eventId);
  shown.firstEventId = Math.min(shown.firstEventId ?? eventId, eventId);
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

function showStored(item, view) {
  if (!markStored(item.event_id)) return;
  const openTurn = () => view.openTurn ?? newTurn(null, view, true);
  switch (item.event_type) {
    case "user_message":
      showUserMessage(item.content, item.attachments, view);
      newTurn(null, view);
      break;
    case "tool_call": {
      const call = parseContent(item);
      const known = shown.resultsFirst.get(call.call_id);
      shown.resultsFirst.delete(call.call_id);
      if (known) fillToolArgs(known, call);
      const view = known ?? showToolCall(openTurn(), call);
      if (call.approval === "required") markRequired(view);
      break;
    }
    case "tool_result": {
      const outcome = parseContent(item);
      const turn = openTurn();
      showToolResult(turn.tools.get(outcome.call_id) ?? showToolCall(turn, { ...outcome, args: undefined }), outcome);
      break;
    }
    case "ai_message":
      showStoredAnswer(item, view);
      break;
  }
}

function showStoredAnswer(item, view) {
  const turn = view.openTurn;
  if (!turn && view === live && shown.unconfirmedDone > 0) {
    shown.unconfirmedDone -= 1; // shown live already, stored since
    return;
  }
  const target = turn ?? newTurn(null, view, true);
  catchUpText(target, item.content);
  finishTurn(target, { finish_reason: item.finish_reason, error: item.error, usage: null }, view);
}

function noAnswerStored(turn, view) {
  finishTurn(turn, { finish_reason: null, error: null, usage: null }, view);
  turn.finish.textContent = "no answer stored for this message yet; reload later to see it";
}

/** Stored events after what is shown (a join's history, a later page), at the end of the log. */
export function showHistory(events) {
  for (const item of events) showStored(item, live);
}

/** After a join's history: the running turn continues from its snapshot, or the open one ended. */
export function catchUpTurn(activeTurn) {
  // A call shown waiting that the turn no longer lists was decided while this tab was away.
  stopWaitingExcept(new Set((activeTurn?.pending_approvals ?? []).map((call) => call.call_id)));
  if (activeTurn) {
    let turn = shown.turns.get(activeTurn.turn_id);
    if (!turn && live.openTurn && !live.openTurn.id) {
      turn = live.openTurn; // its user message came with the history
      turn.id = activeTurn.turn_id;
      turn.article.dataset.turn = turn.id;
      shown.turns.set(turn.id, turn);
    }
    turn ??= newTurn(activeTurn.turn_id, live);
    catchUpText(turn, activeTurn.text);
    turn.nextIndex = activeTurn.next_index ?? 0;
    setRunning(turn.id);
    for (const call of activeTurn.pending_approvals ?? []) {
      awaitDecision(turn.tools.get(call.call_id) ?? showToolCall(turn, call), call);
    }
  } else if (live.openTurn) {
    // No turn runs and no answer is stored for it (yet): it ended while this tab was away.
    noAnswerStored(live.openTurn, live);
  }
}

/** A page of earlier events, put before what is shown without moving what the reader sees. */
export function showEarlier(events) {
  const view = { into: document.createDocumentFragment(), openTurn: null };
  for (const item of events) showStored(item, view);
  const log = ui.log;
  const next = log.querySelector(":scope > article.msg");
  // What stays where the reader sees it: the log's first message, or what its answer began with.
  const anchor = (next?.dataset.continued && next.querySelector(".body").firstElementChild) || next;
  const anchorTop = anchor?.getBoundingClientRect().top;
  const unfinished = view.openTurn;
  if (unfinished && next?.dataset.continued) {
    // The page ended inside a turn the log begins with: one answer, its question now above it.
    const later = Array.from(next.querySelector(".body").childNodes);
    next.querySelector(".body").replaceChildren(...unfinished.body.childNodes, ...later);
    unfinished.article.remove();
    delete next.dataset.continued;
  } else if (unfinished) {
    noAnswerStored(unfinished, view);
  }
  ui.empty.hidden = true;
  (next ?? ui.empty).before(view.into);
  if (anchor) log.scrollTop += anchor.getBoundingClientRect().top - anchorTop;
}

export function setEarlierAvailable(more) {
  ui.loadEarlier.hidden = !more;
  ui.loadEarlier.disabled = false;
}

/** Nothing shown: another session is about to be joined. */
export function clearConversation() {
  for (const element of ui.log.querySelectorAll(":scope > :not(#load-earlier, #empty)")) element.remove();
  ui.empty.hidden = false;
  ui.loadEarlier.hidden = true;
  dirty.clear();
  live.openTurn = null;
  Object.assign(shown, { lastEventId: null, firstEventId: null, unconfirmedDone: 0 });
  shown.seenEvents.clear();
  shown.resultsFirst.clear();
  shown.turns.clear();
  clearApprovals();
  setRunning(null);
}

// ---------- live events ----------

export const liveHandlers = {
  user_message(event) {
    if (event.event_id !== null && shown.seenEvents.has(event.event_id)) return;
    markStored(event.event_id);
    showUserMessage(event.text, event.attachments, live);
    newTurn(event.turn_id, live);
    setRunning(event.turn_id);
  },
  chunk(event) {
    const turn = liveTurn(event.turn_id);
    if (turn.finished || event.index < turn.nextIndex) return; // already in active_turn.text
    appendText(turn, event.text);
    turn.nextIndex = event.index + 1;
  },
  tool_call(event) {
    const turn = liveTurn(event.turn_id);
    if (!turn.tools.has(event.call_id)) showToolCall(turn, event);
  },
  tool_approval_request(event) {
    const turn = liveTurn(event.turn_id);
    awaitDecision(turn.tools.get(event.call_id) ?? showToolCall(turn, event), event);
  },
  tool_approval_result(event) {
    const turn = liveTurn(event.turn_id);
    decided(turn.tools.get(event.call_id) ?? showToolCall(turn, { ...event, args: undefined }), event);
  },
  tool_result(event) {
    const turn = liveTurn(event.turn_id);
    showToolResult(turn.tools.get(event.call_id) ?? showToolCall(turn, event), event);
  },
  done(event) {
    const turn = liveTurn(event.turn_id);
    if (turn.finished) return;
    if (turn.text !== event.text) replaceText(turn, event.text);
    finishTurn(turn, event);
    if (event.event_id === null) shown.unconfirmedDone += 1;
    else markStored(event.event_id);
  },
};
