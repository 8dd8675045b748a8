// A small Markdown renderer for model replies: paragraphs, headings, lists,
// block quotes, emphasis, inline code, fenced code blocks (with a copy
// button), tables and http(s) links.
//
// Model output is untrusted. Every line is HTML-escaped *first*; the markup
// below is then recognised in the escaped text and only fixed tags from this
// file are added, so nothing the model writes can become an element or an
// attribute of its own. Link targets must start with http:// or https://.
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Placeholders for finished inline pieces (code spans, links) use private
  // characters, stripped from the input first, so the model cannot forge one.
  const MARK = "\uE000";
  const MARK_RE = /\uE000(\d+)\uE000/g;

  function inline(escaped) {
    const held = [];
    const hold = (html) => MARK + (held.push(html) - 1) + MARK;
    let s = escaped
      .replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, _ticks, code) => hold("<code>" + code.trim() + "</code>"))
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
        hold('<a href="' + url + '" target="_blank" rel="noopener noreferrer nofollow">' + label + "</a>"))
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([^*]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
    // Held pieces may hold others (a code span inside a link label).
    for (let i = 0; i < 3 && s.includes(MARK); i++) {
      s = s.replace(MARK_RE, (_, n) => held[Number(n)] ?? "");
    }
    return s;
  }

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}&gt;\s?(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function cells(row) {
    let r = row.trim();
    if (r.startsWith("|")) r = r.slice(1);
    if (r.endsWith("|") && !r.endsWith("\\|")) r = r.slice(0, -1);
    return r.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  function codeBlock(lang, lines) {
    return '<div class="code"><div class="code-head"><span>' + lang +
      '</span><button type="button" class="copy">Copy</button></div><pre><code>' +
      lines.join("\n") + "</code></pre></div>";
  }

  // `lines` are escaped already.
  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i++;
        // An unclosed fence runs to the end: a reply still streaming.
        while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(lines[i]);
          i++;
        }
        if (i >= lines.length) {
          while (body.length && !body[body.length - 1].trim()) body.pop();
        }
        i++;
        out.push(codeBlock(m[2], body));
        continue;
      }
      if ((m = HEADING.exec(line))) {
        const level = m[1].length;
        out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
        i++;
        continue;
      }
      if (RULE.test(line)) { out.push("<hr>"); i++; continue; }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
        const head = cells(line);
        const aligns = cells(lines[i + 1]).map((c) =>
          c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
        const attr = (k) => (aligns[k] ? ' class="align-' + aligns[k] + '"' : "");
        let html = "<div class=\"table\"><table><thead><tr>" +
          head.map((c, k) => "<th" + attr(k) + ">" + inline(c) + "</th>").join("") + "</tr></thead><tbody>";
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const row = cells(lines[i]);
          html += "<tr>" + head.map((_, k) => "<td" + attr(k) + ">" + inline(row[k] ?? "") + "</td>").join("") + "</tr>";
          i++;
        }
        out.push(html + "</tbody></table></div>");
        continue;
      }
      if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
        out.push("<blockquote>" + blocks(inner) + "</blockquote>");
        continue;
      }
      if (ITEM.test(line)) {
        const end = list(lines, i, out);
        i = end;
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i]) &&
             !QUOTE.test(lines[i]) && !(para.length && ITEM.test(lines[i])) && !RULE.test(lines[i])) {
        para.push(lines[i].trim());
        i++;
      }
      if (!para.length) { para.push(line.trim()); i++; }
      out.push("<p>" + inline(para.join("\n")).replace(/\n/g, "<br>") + "</p>");
    }
    return out.join("");
  }

  // A list starting at line `start`; nested lists by indentation. Returns
  // the index of the first line after it.
  function list(lines, start, out) {
    const first = ITEM.exec(lines[start]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const startAt = ordered ? parseInt(first[2], 10) : 1;
    const items = [];
    let i = start;
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
        items.push([m[3]]);
        i++;
      } else if (m && m[1].length > indent && items.length) {
        const nested = [];
        i = list(lines, i, nested);
        items[items.length - 1].push(nested.join(""));
        continue;
      } else if (!m && lines[i].trim() && items.length && /^\s+/.test(lines[i])) {
        // A continuation line of the item above.
        items[items.length - 1][0] += "\n" + lines[i].trim();
        i++;
      } else if (!lines[i].trim() && i + 1 < lines.length && ITEM.test(lines[i + 1]) &&
                 ITEM.exec(lines[i + 1])[1].length >= indent) {
        i++; // a blank line between items
      } else {
        break;
      }
    }
    const tag = ordered ? "ol" : "ul";
    const attrs = ordered && startAt !== 1 ? ' start="' + startAt + '"' : "";
    out.push("<" + tag + attrs + ">" + items.map(([text, ...nested]) =>
      "<li>" + inline(text).replace(/\n/g, "<br>") + nested.join("") + "</li>").join("") + "</" + tag + ">");
    return i;
  }

  // Markdown text (from a model) → HTML made of this file's elements only.
  function renderMarkdown(text) {
    const escaped = escapeHtml(String(text ?? "").replace(/[\uE000\u0000]/g, ""));
    return blocks(escaped.replace(/\r\n?/g, "\n").split("\n"));
  }

  window.taperMarkdown = { renderMarkdown, escapeHtml };
})();
