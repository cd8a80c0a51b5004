// Answers' Markdown, rendered safely: markdown-it (vendored, see vendor/markdown-it.LICENSE) with
// raw HTML off, so a model's `<img onerror>` stays text; links only to http(s), opened in a new tab
// without the page as opener or referrer; images shown as links (the CSP loads no other host's
// images, and a model's text should not make the browser fetch anything).
import markdownit from "./vendor/markdown-it.esm.min.js";

const md = markdownit({ html: false, linkify: true, typographer: false });
const { escapeHtml } = md.utils;
const LINK_TARGET = [
  ["target", "_blank"],
  ["rel", "noopener noreferrer"],
];

// Relative, javascript:, data:, vbscript:, file:, mailto: ... are all refused: such a link stays text.
md.validateLink = (url) => /^https?:\/\/[^\s]/i.test(url);

md.renderer.rules.image = (tokens, index, options, env, renderer) => {
  const token = tokens[index];
  const alt = renderer.renderInlineAsText(token.children, options, env).trim();
  const src = escapeHtml(token.attrGet("src"));
  const words = escapeHtml(alt ? `image: ${alt}` : "image");
  return `<a href="${src}" target="_blank" rel="noopener noreferrer" class="image-link">${words}</a>`;
};

// Table alignment comes as style="text-align:..."; the CSP refuses inline styles, so a class says it.
md.core.ruler.push("playground_attributes", (state) => {
  const walk = (tokens) => {
    for (const token of tokens) {
      if (token.type === "link_open") for (const [name, value] of LINK_TARGET) token.attrSet(name, value);
      if (token.type === "th_open" || token.type === "td_open") {
        const align = /text-align:(left|right|center)/.exec(token.attrGet("style") ?? "");
        token.attrs = (token.attrs ?? []).filter(([name]) => name !== "style");
        if (align) token.attrJoin("class", `align-${align[1]}`);
      }
      if (token.children) walk(token.children);
    }
  };
  walk(state.tokens);
});

// What markdown-it writes, and nothing else: a second line of defence should it ever emit more.
const ALLOWED = {
  P: [], BR: [], HR: [], H1: [], H2: [], H3: [], H4: [], H5: [], H6: [], UL: [], LI: [], BLOCKQUOTE: [],
  PRE: [], EM: [], STRONG: [], S: [], TABLE: [], THEAD: [], TBODY: [], TR: [],
  OL: ["start"],
  CODE: ["class"],
  TH: ["class"],
  TD: ["class"],
  A: ["href", "target", "rel", "class"],
};

function keepAllowed(root) {
  for (const element of Array.from(root.querySelectorAll("*"))) {
    const allowed = ALLOWED[element.tagName];
    if (!allowed) {
      element.replaceWith(document.createTextNode(element.textContent));
      continue;
    }
    for (const { name } of Array.from(element.attributes)) if (!allowed.includes(name)) element.removeAttribute(name);
    if (element.tagName === "A" && !md.validateLink(element.getAttribute("href") ?? "")) {
      element.replaceWith(document.createTextNode(element.textContent));
    }
  }
}

// A bar above each code block: its language (from the fence) and a Copy button.
function addCopyButtons(root) {
  for (const pre of Array.from(root.querySelectorAll("pre"))) {
    const block = document.createElement("div");
    block.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const language = document.createElement("span");
    language.className = "code-language";
    language.textContent = /\blanguage-(\S+)/.exec(pre.querySelector("code")?.className ?? "")?.[1] ?? "";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    head.append(language, button);
    pre.replaceWith(block);
    block.append(head, pre);
  }
}

/** The Markdown `source` as DOM nodes to put in an answer (a template's content: inert, nothing loads). */
export function renderMarkdown(source) {
  const template = document.createElement("template");
  template.innerHTML = md.render(source);
  keepAllowed(template.content);
  addCopyButtons(template.content);
  return template.content;
}

// Without the async clipboard (plain http on a LAN address is no secure context): select the code
// and use the old copy command; failing that, the code stays selected for the person to copy.
function copyBySelection(code) {
  const selection = window.getSelection();
  selection.selectAllChildren(code);
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  if (copied) selection.removeAllRanges();
  return copied;
}

/** Copy the code block's text; the button says whether it worked. */
export async function copyCode(button) {
  const code = button.closest(".code-block").querySelector("pre code");
  let copied = false;
  try {
    await navigator.clipboard.writeText(code.textContent);
    copied = true;
  } catch {
    copied = copyBySelection(code);
  }
  button.textContent = copied ? "Copied" : "Press Ctrl+C";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}
