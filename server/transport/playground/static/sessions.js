// The list of the user's chats beside the conversation (docs/protocol.md, Conversations): newest
// first, a page at a time as it is scrolled, rename and delete per item, kept current by the
// `session_updated` and `session_deleted` events every socket of the user receives.
import { ApiError, anonymousOwner, api, sessionPath } from "./api.js";

const PAGE_SIZE = 20;
const $ = (id) => document.getElementById(id);
const ui = {
  list: $("session-list"),
  status: $("sessions-status"),
  notice: $("sessions-notice"),
};

const list = {
  items: new Map(), // session_id -> { li, session }
  cursor: null,
  exhausted: false,
  loading: false,
  started: false, // nothing is asked before the first connection says who the user is
  generation: 0, // bumped by a reload: an older page's answer is dropped
  currentId: null,
  open: () => {}, // set by setUpSessionList: open that session in the conversation
};

const whenFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function formatTime(iso) {
  const moment = iso ? new Date(iso) : null;
  return moment && !Number.isNaN(moment.getTime()) ? whenFormat.format(moment) : "";
}

/** A session's name in the list and the header: its title, or when it started. */
export function displayTitle(session) {
  if (session.title) return session.title;
  const started = formatTime(session.start_time ?? session.updated_at);
  return started ? `Chat of ${started}` : "New chat";
}

function setListNotice(text) {
  ui.notice.textContent = text ?? "";
  ui.notice.hidden = !text;
}

function failure(error, doing) {
  const code = error instanceof ApiError ? error.code : "error";
  return `Could not ${doing}: ${error.message} (${code})`;
}

function button(className, text, label) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  if (label) {
    element.setAttribute("aria-label", label);
    element.title = label;
  }
  return element;
}

// ---------- items ----------

function drawItem(entry) {
  const { li, session } = entry;
  const open = button("chat-open", "");
  const title = document.createElement("span");
  title.className = session.title ? "chat-name" : "chat-name untitled";
  title.textContent = displayTitle(session);
  const time = document.createElement("time");
  time.className = "chat-time";
  time.dateTime = session.updated_at ?? "";
  time.textContent = formatTime(session.updated_at);
  open.append(title, time);
  open.title = displayTitle(session);
  if (session.session_id === list.currentId) open.setAttribute("aria-current", "page");
  const actions = document.createElement("span");
  actions.className = "chat-actions";
  actions.append(button("chat-rename", "✎", "Rename"), button("chat-delete", "✕", "Delete"));
  li.replaceChildren(open, actions);
  li.classList.toggle("current", session.session_id === list.currentId);
}

function newEntry(session) {
  const li = document.createElement("li");
  li.className = "chat-entry";
  li.dataset.session = session.session_id;
  const entry = { li, session: { ...session } };
  list.items.set(session.session_id, entry);
  drawItem(entry);
  return entry;
}

function showEmptiness() {
  if (list.loading) ui.status.textContent = "Loading…";
  else ui.status.textContent = list.items.size ? "" : "No chats yet: your conversations appear here.";
}

// Where a session belongs among those loaded (updated_at descending, then session_id descending);
// null when past the last loaded one while more pages exist: paging will bring it.
function placeFor(session) {
  for (const { li, session: other } of list.items.values()) {
    if (other.session_id === session.session_id) continue;
    const newer = (session.updated_at ?? "") > (other.updated_at ?? "");
    const tie = session.updated_at === other.updated_at && session.session_id > other.session_id;
    if (newer || tie) return { before: li };
  }
  return list.exhausted ? { before: null } : null;
}

function moveToTop(entry) {
  ui.list.prepend(entry.li);
  // The Map keeps the list's order too (placeFor walks it).
  list.items.delete(entry.session.session_id);
  list.items = new Map([[entry.session.session_id, entry], ...list.items]);
}

// ---------- pages ----------

async function loadMore() {
  if (!list.started || list.loading || list.exhausted) return;
  list.loading = true;
  showEmptiness();
  const generation = list.generation;
  try {
    const page = await api("/api/sessions", { query: { limit: PAGE_SIZE, cursor: list.cursor, ...anonymousOwner() } });
    if (generation !== list.generation) return;
    for (const session of page.sessions) {
      if (!list.items.has(session.session_id)) ui.list.append(newEntry(session).li);
    }
    list.cursor = page.next_cursor;
    list.exhausted = page.next_cursor === null;
    setListNotice(null);
  } catch (error) {
    if (generation === list.generation) setListNotice(failure(error, "load your chats"));
    return;
  } finally {
    if (generation === list.generation) list.loading = false;
    showEmptiness();
  }
  fillView();
}

function nearEnd() {
  const { scrollTop, scrollHeight, clientHeight } = ui.list;
  return clientHeight > 0 && scrollHeight - scrollTop - clientHeight < 120;
}

// A list shorter than its box gets no scroll event: take the next page at once.
function fillView() {
  if (!list.exhausted && nearEnd()) loadMore();
}

/** Start the list again from its first page (on connect: events may have been missed meanwhile). */
export function reloadSessions() {
  list.started = true;
  list.generation += 1;
  list.items.clear();
  list.cursor = null;
  list.exhausted = false;
  list.loading = false;
  ui.list.replaceChildren();
  return loadMore();
}

// ---------- kept current ----------

/** The open session, highlighted. */
export function setCurrentSession(sessionId) {
  list.currentId = sessionId;
  for (const { li, session } of list.items.values()) {
    const current = session.session_id === sessionId;
    li.classList.toggle("current", current);
    li.querySelector(".chat-open")?.toggleAttribute("aria-current", false);
    if (current) li.querySelector(".chat-open")?.setAttribute("aria-current", "page");
  }
}

/** The open session changed now (a message was sent in it): first in the list, added if new. */
export function sessionTouched(session) {
  const entry = list.items.get(session.session_id) ?? newEntry(session);
  entry.session = { ...entry.session, updated_at: new Date().toISOString() };
  drawItem(entry);
  moveToTop(entry);
  showEmptiness();
}

const removed = new Set(); // sessions deleted while this page is open

/** `session_updated`: a new title, and first in the list when `updated_at` moved (a rename). */
export function sessionUpdated({ session_id, title, updated_at }) {
  if (removed.has(session_id)) return; // a late title must not bring a deleted chat back
  const entry = list.items.get(session_id);
  if (!entry) {
    const session = { session_id, title, updated_at, start_time: updated_at };
    const place = placeFor(session);
    if (place) ui.list.insertBefore(newEntry(session).li, place.before);
    showEmptiness();
    return;
  }
  const moved = updated_at !== entry.session.updated_at;
  entry.session = { ...entry.session, title, updated_at };
  drawItem(entry);
  if (moved) moveToTop(entry);
}

/** `session_deleted` (or this tab's own delete): out of the list. */
export function sessionRemoved(sessionId) {
  removed.add(sessionId);
  const entry = list.items.get(sessionId);
  if (!entry) return;
  entry.li.remove();
  list.items.delete(sessionId);
  showEmptiness();
  fillView();
}

// ---------- rename and delete ----------

function startRename(entry) {
  const form = document.createElement("form");
  form.className = "chat-edit";
  const input = document.createElement("input");
  input.value = entry.session.title ?? "";
  input.maxLength = 200;
  input.required = true;
  input.setAttribute("aria-label", "New title");
  form.append(input, button("chat-save", "Save"), button("chat-cancel", "Cancel"));
  form.querySelector(".chat-save").type = "submit";
  entry.li.replaceChildren(form);
  input.focus();
  input.select();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    rename(entry, input.value.trim());
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      drawItem(entry);
    }
  });
}

async function rename(entry, title) {
  if (!title || title === entry.session.title) {
    drawItem(entry);
    return;
  }
  try {
    const session = await api(sessionPath(entry.session.session_id), { method: "PATCH", body: { title } });
    setListNotice(null);
    sessionUpdated(session);
  } catch (error) {
    setListNotice(failure(error, "rename that chat"));
    drawItem(entry);
  }
}

function confirmDelete(entry) {
  const box = document.createElement("div");
  box.className = "chat-confirm";
  box.setAttribute("role", "group");
  const question = document.createElement("span");
  question.textContent = `Delete “${displayTitle(entry.session)}”?`;
  box.append(question, button("chat-delete-yes danger", "Delete"), button("chat-cancel", "Cancel"));
  entry.li.replaceChildren(box);
  box.querySelector(".chat-cancel").focus();
}

async function remove(entry) {
  try {
    await api(sessionPath(entry.session.session_id), { method: "DELETE" });
    setListNotice(null);
    sessionRemoved(entry.session.session_id);
  } catch (error) {
    setListNotice(failure(error, "delete that chat"));
    drawItem(entry);
  }
}

function onClick(event) {
  const target = event.target.closest("button");
  const li = target?.closest("li.chat-entry");
  const entry = li && list.items.get(li.dataset.session);
  if (!entry) return;
  if (target.classList.contains("chat-open")) list.open(entry.session.session_id);
  else if (target.classList.contains("chat-rename")) startRename(entry);
  else if (target.classList.contains("chat-delete")) confirmDelete(entry);
  else if (target.classList.contains("chat-delete-yes")) remove(entry);
  else if (target.classList.contains("chat-cancel")) drawItem(entry);
}

/** `open(sessionId)`: what choosing a chat in the list does. */
export function setUpSessionList({ open }) {
  list.open = open;
  ui.list.addEventListener("click", onClick);
  ui.list.addEventListener("scroll", () => {
    if (nearEnd()) loadMore();
  });
  // The list's box changes size with the window and the drawer: it may hold more now.
  new ResizeObserver(fillView).observe(ui.list);
}
