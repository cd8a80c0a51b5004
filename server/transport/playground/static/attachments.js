// Files attached to the message being written (a button, dropped on the page, a pasted image):
// each uploaded at once to POST /api/sessions/{id}/attachments, its progress shown, removable
// before sending; and the attachments of messages in the conversation. With authentication on,
// neither an <img> nor a link can send the token: the file is fetched with it and shown or saved
// from a blob: URL.
import { ApiError, sessionPath, token } from "./api.js";

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("attachments"),
  button: $("attach"),
  input: $("attach-input"),
  notice: $("attach-notice"),
  message: $("message"),
};

// What a person reads for an upload's refusal; the service's message (its limit, the types it
// takes) follows.
const REFUSALS = {
  too_large: "is larger than this service accepts",
  unsupported_media_type: "is not a kind of file this service takes",
  // A file far over the limit may be cut off before its answer, like a service that is gone.
  unreachable:
    "could not be uploaded: the connection ended without an answer (the service is unreachable, or the file far too large)",
};

const pending = []; // {file, element, request, attachment}: in the order attached
const setup = { sessionId: () => null, usable: () => false };

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

export const attachmentPath = (attachmentId) => `/api/attachments/${encodeURIComponent(attachmentId)}`;

// ---------- the service's files, with the token when there is one ----------

const blobUrls = new Map(); // attachment_id -> Promise of a blob: URL (only with a token)

async function fetchFile(attachmentId) {
  const response = await fetch(attachmentPath(attachmentId), { headers: { Authorization: `Bearer ${token.get()}` } });
  if (!response.ok) throw new ApiError(response.status, `http_${response.status}`, response.statusText);
  return URL.createObjectURL(await response.blob());
}

function blobUrl(attachmentId) {
  let url = blobUrls.get(attachmentId);
  if (!url) {
    url = fetchFile(attachmentId);
    blobUrls.set(attachmentId, url);
    url.catch(() => blobUrls.delete(attachmentId)); // asked again next time
  }
  return url;
}

function image(attachment) {
  const img = node("img", "attachment-image");
  img.alt = attachment.name;
  if (!token.get()) img.src = attachmentPath(attachment.attachment_id);
  else
    blobUrl(attachment.attachment_id).then(
      (url) => (img.src = url),
      () => (img.alt = `${attachment.name} (could not be loaded)`),
    );
  return img;
}

// A plain link downloads the file (the service answers it as an attachment); with a token the
// click fetches it and saves it under its name.
async function saveWithToken(event, attachment) {
  if (!token.get()) return;
  event.preventDefault();
  try {
    const save = node("a");
    save.href = await blobUrl(attachment.attachment_id);
    save.download = attachment.name;
    save.click();
  } catch {
    event.target.closest("a").title = "Could not be downloaded";
  }
}

function isImage(attachment) {
  return attachment.mime_type?.startsWith("image/");
}

/** One attachment as a link to its file: a thumbnail for an image, else its name and size. */
export function attachmentLink(attachment) {
  const link = node("a", "attachment-link");
  link.href = attachmentPath(attachment.attachment_id);
  link.addEventListener("click", (event) => saveWithToken(event, attachment));
  if (isImage(attachment)) {
    link.append(image(attachment));
    link.setAttribute("aria-label", `${attachment.name}, download`);
  } else {
    const name = node("span", "attachment-name", attachment.name);
    link.append(name, node("span", "attachment-size", size(attachment.size)));
  }
  return link;
}

/** A message's attachments as the conversation shows them (null: none). */
export function attachmentList(attachments) {
  if (!Array.isArray(attachments) || attachments.length === 0) return null;
  const list = node("ul", "attachments sent");
  list.setAttribute("aria-label", "Attachments");
  for (const attachment of attachments) {
    const item = node("li", isImage(attachment) ? "attachment image" : "attachment file");
    item.append(attachmentLink(attachment));
    list.append(item);
  }
  return list;
}

function size(bytes) {
  if (typeof bytes !== "number") return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

// ---------- the message being written ----------

function refusalText(name, error) {
  const words = REFUSALS[error.code] ?? "could not be uploaded";
  const detail = error.code === "unreachable" ? "." : `: ${error.message} (${error.code})`;
  return `“${name}” ${words}${detail}`;
}

function refuse(entry, error) {
  remove(entry);
  const line = node("p", null, refusalText(entry.file.name, error));
  ui.notice.append(line);
  ui.notice.hidden = false;
}

function answerError(request) {
  let detail = {};
  try {
    detail = JSON.parse(request.responseText)?.detail ?? {};
  } catch {
    // a proxy's page, not the service's JSON
  }
  return new ApiError(request.status, detail.code ?? `http_${request.status}`, detail.message ?? request.statusText);
}

// XMLHttpRequest, not fetch: only it reports an upload's progress.
function upload(entry, sessionId) {
  const request = new XMLHttpRequest();
  entry.request = request;
  request.open("POST", `${sessionPath(sessionId)}/attachments`);
  const bearer = token.get();
  if (bearer) request.setRequestHeader("Authorization", `Bearer ${bearer}`);
  request.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) entry.progress.value = event.loaded / event.total;
  });
  request.addEventListener("load", () => {
    entry.request = null;
    if (request.status === 201) uploaded(entry, JSON.parse(request.responseText));
    else refuse(entry, answerError(request));
  });
  request.addEventListener("error", () => {
    entry.request = null;
    refuse(entry, new ApiError(0, "unreachable", "the service could not be reached"));
  });
  const form = new FormData();
  form.append("file", entry.file, entry.file.name || "pasted");
  request.send(form);
}

function uploaded(entry, attachment) {
  entry.attachment = attachment;
  entry.progress.remove();
  entry.element.dataset.state = "uploaded";
  const preview = entry.element.querySelector(".attachment-preview");
  if (isImage(attachment)) preview.replaceChildren(image(attachment));
  else preview.append(node("span", "attachment-size", size(attachment.size)));
}

function remove(entry) {
  entry.request?.abort();
  entry.element.remove();
  const index = pending.indexOf(entry);
  if (index >= 0) pending.splice(index, 1);
  ui.list.hidden = pending.length === 0;
}

function pendingItem(entry) {
  const name = entry.file.name || "pasted file";
  const item = node("li", "attachment pending");
  item.dataset.state = "uploading";
  const preview = node("span", "attachment-preview");
  preview.append(node("span", "attachment-name", name));
  entry.progress = node("progress", "attachment-progress");
  entry.progress.max = 1;
  entry.progress.value = 0;
  entry.progress.setAttribute("aria-label", `Uploading ${name}`);
  const drop = node("button", "attachment-remove", "×");
  drop.type = "button";
  drop.setAttribute("aria-label", `Remove ${name}`);
  drop.addEventListener("click", () => {
    remove(entry);
    ui.message.focus();
  });
  item.append(preview, entry.progress, drop);
  item.title = name;
  return item;
}

/** Upload these files for the open session, each shown with the message being written. */
export function attach(files) {
  const sessionId = setup.sessionId();
  if (!files.length) return;
  if (!sessionId || !setup.usable()) {
    ui.notice.replaceChildren(node("p", null, "Files can be attached once this tab is in a session."));
    ui.notice.hidden = false;
    return;
  }
  ui.notice.replaceChildren();
  ui.notice.hidden = true;
  for (const file of files) {
    const entry = { file, request: null, attachment: null };
    entry.element = pendingItem(entry);
    pending.push(entry);
    ui.list.append(entry.element);
    ui.list.hidden = false;
    upload(entry, sessionId);
  }
}

/** The uploaded files' ids for the message being sent, or null while one is still uploading. */
export function readyAttachments() {
  if (pending.some((entry) => !entry.attachment)) return null;
  return pending.map((entry) => entry.attachment.attachment_id);
}

/** The message went with these: they leave the composer (those attached meanwhile stay). */
export function sentAttachments(ids) {
  for (const entry of pending.slice()) if (ids.includes(entry.attachment?.attachment_id)) remove(entry);
}

/** Another session is opened: what was attached for this one is dropped. */
export function clearAttachments() {
  for (const entry of pending.slice()) remove(entry);
  ui.notice.replaceChildren();
  ui.notice.hidden = true;
}

export function setAttachUsable(usable) {
  ui.button.disabled = !usable;
}

function hasFiles(event) {
  return Array.from(event.dataTransfer?.types ?? []).includes("Files");
}

function setUpDropping() {
  let depth = 0; // dragenter/dragleave come for every element crossed
  const dropping = (on) => document.body.classList.toggle("dropping", on);
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    dropping(true);
  });
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    depth = Math.max(0, depth - 1);
    if (depth === 0) dropping(false);
  });
  document.addEventListener("dragover", (event) => {
    if (hasFiles(event)) event.preventDefault(); // else the browser opens the file instead
  });
  document.addEventListener("drop", (event) => {
    depth = 0;
    dropping(false);
    if (!hasFiles(event)) return;
    event.preventDefault();
    attach(Array.from(event.dataTransfer.files));
  });
}

export function setUpAttachments({ sessionId, usable }) {
  Object.assign(setup, { sessionId, usable });
  ui.button.addEventListener("click", () => ui.input.click());
  ui.input.addEventListener("change", () => {
    attach(Array.from(ui.input.files));
    ui.input.value = ""; // the same file can be chosen again
  });
  // A pasted image (a screenshot) is attached; pasted text stays the browser's to paste.
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files ?? []);
    if (!files.length) return;
    if (!event.clipboardData.types.includes("text/plain")) event.preventDefault();
    attach(files);
  });
  setUpDropping();
}
