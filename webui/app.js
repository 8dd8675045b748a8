// taper's chat page: conversations in localStorage, replies streamed from
// /v1/chat/completions (SSE read from fetch's body), Stop through an
// AbortController (the server sees the disconnect and cancels the
// generation). Model text reaches the DOM only as textContent or through
// markdown.js, which escapes it before adding its own markup.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const STORE = { chats: "taper.conversations", current: "taper.current", settings: "taper.settings", key: "taper.apiKey" };

  const load = (key, fallback) => {
    try {
      const v = JSON.parse(localStorage.getItem(key));
      return v ?? fallback;
    } catch {
      return fallback;
    }
  };
  const save = (key, value) => {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      // A full store (very long chats) must not break the chat in progress.
      console.warn("could not save", key, e);
    }
  };

  const state = {
    chats: load(STORE.chats, []).filter((c) => c && Array.isArray(c.messages)),
    current: load(STORE.current, null),
    settings: Object.assign({ system: "", temperature: "", top_p: "", max_tokens: "" }, load(STORE.settings, {})),
    model: null, // {id, max_model_len}
    busy: null, // {controller, message}
    editing: false,
  };

  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  const currentChat = () => state.chats.find((c) => c.id === state.current) || null;
  const persist = () => {
    save(STORE.chats, state.chats);
    save(STORE.current, state.current);
  };

  // ---- the server ------------------------------------------------------------

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = localStorage.getItem(STORE.key);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // Resolves once the user gave a key (after a 401).
  function askKey(message) {
    return new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-message").textContent = message;
      $("key-input").value = "";
      dialog.onclose = () => {
        const key = $("key-input").value.trim();
        if (key) localStorage.setItem(STORE.key, key);
        resolve();
      };
      if (!dialog.open) dialog.showModal();
    });
  }

  // fetch with the key; a 401 asks for a key and tries again.
  async function api(path, init = {}) {
    for (;;) {
      const res = await fetch(path, Object.assign({}, init, { headers: headers() }));
      if (res.status !== 401) return res;
      const had = localStorage.getItem(STORE.key);
      localStorage.removeItem(STORE.key);
      await askKey(had ? "The server refused that key; try again." : "This server needs an API key.");
    }
  }

  async function errorText(res) {
    try {
      const body = await res.json();
      return body?.error?.message || res.status + " " + res.statusText;
    } catch {
      return res.status + " " + res.statusText;
    }
  }

  async function loadModel() {
    for (;;) {
      try {
        const res = await api("/v1/models");
        if (res.ok) {
          const card = (await res.json()).data?.[0];
          if (card) {
            state.model = { id: card.id, max_model_len: card.max_model_len };
            $("model-name").textContent = card.id;
            $("model-ctx").textContent = card.max_model_len ? "· context " + card.max_model_len : "";
            return;
          }
        }
        $("model-name").textContent = res.status === 503 ? "loading the model…" : await errorText(res);
      } catch {
        $("model-name").textContent = "server unreachable, retrying…";
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  // ---- conversations -----------------------------------------------------------

  function titleOf(chat) {
    const first = chat.messages.find((m) => m.role === "user");
    return first ? first.content.slice(0, 48) || "(empty)" : "New chat";
  }

  function renderList() {
    const ul = $("conversations");
    ul.replaceChildren();
    for (const chat of [...state.chats].sort((a, b) => b.updated - a.updated)) {
      const li = document.createElement("li");
      li.className = chat.id === state.current ? "active" : "";
      li.dataset.id = chat.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = titleOf(chat);
      open.title = titleOf(chat);
      open.onclick = () => switchTo(chat.id);
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.setAttribute("aria-label", "Delete conversation");
      del.textContent = "×";
      del.onclick = () => removeChat(chat.id);
      li.append(open, del);
      ul.append(li);
    }
  }

  function switchTo(id) {
    if (state.busy) stop();
    state.current = id;
    setEditing(false);
    persist();
    renderList();
    renderMessages();
    document.body.classList.remove("sidebar-open");
    $("scrim").hidden = true;
  }

  function newChat() {
    // An empty conversation is reused rather than piling up.
    const empty = state.chats.find((c) => !c.messages.length);
    if (empty) return switchTo(empty.id);
    const chat = { id: newId(), created: Date.now(), updated: Date.now(), messages: [] };
    state.chats.push(chat);
    switchTo(chat.id);
    $("input").focus();
  }

  function removeChat(id) {
    if (state.busy && state.current === id) stop();
    state.chats = state.chats.filter((c) => c.id !== id);
    if (state.current === id) state.current = state.chats[0]?.id ?? null;
    persist();
    renderList();
    renderMessages();
  }

  function exportChats() {
    const data = JSON.stringify({ exported: new Date().toISOString(), model: state.model?.id ?? null, conversations: state.chats }, null, 2);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([data], { type: "application/json" }));
    a.download = "taper-chats-" + new Date().toISOString().slice(0, 10) + ".json";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  // ---- messages ------------------------------------------------------------------

  function renderMessages() {
    const box = $("messages");
    box.replaceChildren();
    const chat = currentChat();
    if (!chat || !chat.messages.length) {
      const empty = document.createElement("div");
      empty.className = "empty";
      empty.textContent = "Send a message to start.";
      box.append(empty);
      return;
    }
    chat.messages.forEach((m, i) => box.append(messageView(m, i, chat)));
    box.scrollTop = box.scrollHeight;
  }

  function button(text, cls, onclick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.textContent = text;
    b.onclick = onclick;
    return b;
  }

  function messageView(m, index, chat) {
    const el = document.createElement("div");
    el.className = "msg " + m.role;
    const last = index === chat.messages.length - 1;
    if (m.role === "user") {
      const body = document.createElement("div");
      body.className = "text";
      body.textContent = m.content;
      el.append(body);
      const lastUser = chat.messages.map((x) => x.role).lastIndexOf("user") === index;
      if (lastUser && !state.busy) {
        const actions = document.createElement("div");
        actions.className = "actions";
        actions.append(button("Edit", "edit", () => startEdit(index)));
        el.append(actions);
      }
      return el;
    }
    fillAssistant(el, m);
    if (last && !state.busy) {
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(button("Regenerate", "regenerate", regenerate));
      el.append(actions);
    }
    return el;
  }

  // An assistant message's parts; called again as its stream grows.
  function fillAssistant(el, m) {
    const parts = [];
    if (m.reasoning) {
      const d = document.createElement("details");
      d.className = "reasoning";
      d.open = !!el.querySelector("details.reasoning[open]");
      const s = document.createElement("summary");
      s.textContent = m.content || !m.streaming ? "Reasoning" : "Reasoning…";
      const body = document.createElement("div");
      body.className = "text";
      body.textContent = m.reasoning;
      d.append(s, body);
      parts.push(d);
    }
    if (m.tool_calls?.length) {
      const d = document.createElement("details");
      d.className = "tool-calls";
      d.open = true;
      const s = document.createElement("summary");
      s.textContent = "Tool calls";
      d.append(s);
      for (const call of m.tool_calls) {
        const pre = document.createElement("pre");
        pre.textContent = (call.function?.name ?? "?") + "(" + (call.function?.arguments ?? "") + ")";
        d.append(pre);
      }
      parts.push(d);
    }
    const body = document.createElement("div");
    body.className = "md";
    body.innerHTML = window.taperMarkdown.renderMarkdown(m.content || "");
    parts.push(body);
    if (m.error) {
      const e = document.createElement("div");
      e.className = "error";
      e.textContent = m.error;
      parts.push(e);
    }
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = statsText(m);
    parts.push(stats);
    el.replaceChildren(...parts);
  }

  function statsText(m) {
    if (m.streaming) return "…";
    const bits = [];
    if (m.stats?.tokens != null) bits.push(m.stats.tokens + " tokens");
    if (m.stats?.tokens_per_s != null) bits.push(m.stats.tokens_per_s.toFixed(1) + " tokens/s");
    if (m.stats?.finish) bits.push(m.stats.finish);
    return bits.join(" · ");
  }

  // ---- sending ---------------------------------------------------------------------

  function requestBody(chat) {
    const s = state.settings;
    const messages = [];
    if (s.system.trim()) messages.push({ role: "system", content: s.system });
    for (const m of chat.messages) {
      if (m.role === "assistant" && m.error && !m.content) continue;
      messages.push({ role: m.role, content: m.content || "" });
    }
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model.id;
    for (const [field, key, parse] of [["temperature", "temperature", Number], ["top_p", "top_p", Number], ["max_tokens", "max_tokens", (v) => parseInt(v, 10)]]) {
      const v = String(s[key]).trim();
      if (v !== "" && Number.isFinite(parse(v))) body[field] = parse(v);
    }
    return body;
  }

  // Reads an SSE body, calling `onData` with each `data:` payload.
  async function readEvents(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data && onData(data) === false) return;
      }
    }
  }

  async function generate(chat) {
    const request = JSON.stringify(requestBody(chat));
    const reply = { role: "assistant", content: "", streaming: true };
    chat.messages.push(reply);
    chat.updated = Date.now();
    persist();
    renderList();
    renderMessages();
    const el = $("messages").lastElementChild;
    const controller = new AbortController();
    state.busy = { controller, reply };
    setBusy(true);

    // Redraws at most every 50 ms: re-rendering the whole reply per token
    // would cost quadratic time on long replies.
    let timer = null;
    const redraw = () => {
      timer = null;
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      fillAssistant(el, reply);
      if (atBottom) box.scrollTop = box.scrollHeight;
    };
    const schedule = () => { timer ??= setTimeout(redraw, 50); };

    const started = performance.now();
    let first = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    try {
      const res = await api("/v1/chat/completions", { method: "POST", body: request, signal: controller.signal });
      if (!res.ok) throw new Error(await errorText(res));
      await readEvents(res.body, (data) => {
        if (data === "[DONE]") return false;
        let chunk;
        try { chunk = JSON.parse(data); } catch { return; }
        if (chunk.error) { reply.error = chunk.error.message || "the server failed"; return; }
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices?.[0];
        if (!choice) return;
        const d = choice.delta || {};
        if (d.content || d.reasoning_content || d.tool_calls) {
          first ??= performance.now();
          chunks++;
        }
        if (d.content) reply.content += d.content;
        if (d.reasoning_content) reply.reasoning = (reply.reasoning || "") + d.reasoning_content;
        for (const call of d.tool_calls || []) {
          // Calls arrive in pieces: the name first, arguments in fragments.
          reply.tool_calls ??= [];
          const i = call.index ?? reply.tool_calls.length;
          const into = (reply.tool_calls[i] ??= { id: call.id, type: "function", function: { name: "", arguments: "" } });
          if (call.id) into.id = call.id;
          if (call.function?.name) into.function.name += call.function.name;
          if (call.function?.arguments) into.function.arguments += call.function.arguments;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        schedule();
      });
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else reply.error = String(e.message || e);
    }
    const ended = performance.now();
    const tokens = usage?.completion_tokens ?? chunks;
    // Decode speed: tokens after the first, over the time since it came.
    const span = first != null ? (ended - first) / 1000 : 0;
    reply.stats = {
      tokens,
      tokens_per_s: span > 0 && tokens > 1 ? (tokens - 1) / span : null,
      first_token_ms: first != null ? Math.round(first - started) : null,
      finish,
    };
    delete reply.streaming;
    clearTimeout(timer);
    state.busy = null;
    chat.updated = Date.now();
    persist();
    setBusy(false);
    renderMessages();
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function stop() {
    state.busy?.controller.abort();
  }

  function send() {
    if (state.busy) return;
    const input = $("input");
    const text = input.value;
    if (!text.trim()) return;
    let chat = currentChat();
    if (!chat) {
      chat = { id: newId(), created: Date.now(), updated: Date.now(), messages: [] };
      state.chats.push(chat);
      state.current = chat.id;
    }
    if (state.editing) {
      // Edit-and-resend: the last user message and what followed it go.
      const at = chat.messages.map((m) => m.role).lastIndexOf("user");
      if (at >= 0) chat.messages.length = at;
      setEditing(false);
    }
    chat.messages.push({ role: "user", content: text });
    input.value = "";
    autosize();
    generate(chat);
  }

  function regenerate() {
    const chat = currentChat();
    if (!chat || state.busy) return;
    while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
    if (chat.messages.length) generate(chat);
  }

  function startEdit(index) {
    const chat = currentChat();
    if (!chat || state.busy) return;
    $("input").value = chat.messages[index].content;
    setEditing(true);
    autosize();
    $("input").focus();
  }

  function setEditing(on) {
    state.editing = on;
    $("editing").hidden = !on;
  }

  function autosize() {
    const input = $("input");
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight, 200) + "px";
  }

  // ---- settings ------------------------------------------------------------------------

  const FIELDS = [["set-system", "system"], ["set-temperature", "temperature"], ["set-top-p", "top_p"], ["set-max-tokens", "max_tokens"]];

  function openSettings() {
    for (const [id, key] of FIELDS) $(id).value = state.settings[key];
    $("settings").showModal();
  }

  function closeSettings() {
    if ($("settings").returnValue !== "save") return;
    for (const [id, key] of FIELDS) state.settings[key] = $(id).value;
    save(STORE.settings, state.settings);
  }

  // ---- copying code ----------------------------------------------------------------------

  async function copyCode(buttonEl) {
    const code = buttonEl.closest(".code")?.querySelector("code")?.textContent ?? "";
    try {
      await navigator.clipboard.writeText(code);
    } catch {
      // No clipboard API outside secure contexts (http on a LAN address).
      const area = document.createElement("textarea");
      area.value = code;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    buttonEl.textContent = "Copied";
    setTimeout(() => { buttonEl.textContent = "Copy"; }, 1500);
  }

  // ---- wiring ------------------------------------------------------------------------------

  function start() {
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      } else if (e.key === "Escape" && state.editing) {
        setEditing(false);
        $("input").value = "";
      }
    });
    $("input").addEventListener("input", autosize);
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("export").addEventListener("click", exportChats);
    $("open-settings").addEventListener("click", openSettings);
    $("settings").addEventListener("close", closeSettings);
    $("cancel-edit").addEventListener("click", () => { setEditing(false); $("input").value = ""; });
    const toggle = (open) => {
      document.body.classList.toggle("sidebar-open", open);
      $("scrim").hidden = !open;
    };
    $("toggle-sidebar").addEventListener("click", () => toggle(!document.body.classList.contains("sidebar-open")));
    $("scrim").addEventListener("click", () => toggle(false));
    $("messages").addEventListener("click", (e) => {
      const b = e.target.closest("button.copy");
      if (b) copyCode(b);
    });
    // A reply that was streaming when the page went away ended there.
    for (const m of state.chats.flatMap((c) => c.messages)) {
      if (m.streaming) {
        delete m.streaming;
        m.stats = { finish: "interrupted" };
      }
    }
    if (!currentChat()) state.current = state.chats[0]?.id ?? null;
    renderList();
    renderMessages();
    loadModel();
    $("input").focus();
  }

  // For the browser tests: the renderer as the page uses it.
  window.taper = { renderMarkdown: (t) => window.taperMarkdown.renderMarkdown(t), state };
  start();
})();
