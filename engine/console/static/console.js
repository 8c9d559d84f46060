// The approvals console's enhancements; every page works without them (plain forms).
// - Approve / Deny: sent with fetch (the session's CSRF token in X-CSRF-Token), the card
//   replaced in place by the server's rendering of it.
// - Live updates: /console/events (server-sent events) adds new pending approvals and
//   updates or removes decided ones without a reload.
// - Relative times ("in 4 min") kept current.
"use strict";

(function () {
  const csrf = document.body.dataset.csrf || "";

  function parseCard(html) {
    const template = document.createElement("template");
    template.innerHTML = html.trim(); // rendered and escaped by the server's templates
    return template.content.firstElementChild;
  }

  function span(seconds) {
    seconds = Math.floor(Math.abs(seconds));
    if (seconds < 60) return seconds + " s";
    let minutes = Math.floor(seconds / 60);
    const rest = seconds % 60;
    if (minutes < 60) return minutes < 10 && rest ? minutes + " min " + rest + " s" : minutes + " min";
    const hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    if (hours < 48) return minutes ? hours + " h " + minutes + " min" : hours + " h";
    return Math.floor(hours / 24) + " days";
  }

  function tick() {
    const now = Date.now();
    for (const el of document.querySelectorAll(".card time[datetime]")) {
      const at = Date.parse(el.getAttribute("datetime"));
      if (isNaN(at)) continue;
      const delta = (at - now) / 1000;
      el.textContent = delta >= 0 ? "in " + span(delta) : span(delta) + " ago";
    }
  }

  function updateEmpty() {
    const list = document.getElementById("pending");
    const empty = document.getElementById("empty");
    if (list && empty) empty.hidden = list.querySelector(".card") !== null;
  }

  function place(card) {
    const list = document.getElementById("pending");
    const existing = document.getElementById(card.id);
    if (list) {
      if (card.dataset.status !== "pending") {
        if (existing) existing.remove();
      } else if (existing) {
        existing.replaceWith(card);
      } else {
        card.classList.add("fresh");
        list.prepend(card); // newest first
      }
      updateEmpty();
    } else if (existing) {
      existing.replaceWith(card);
    }
    wire(card);
  }

  function wire(root) {
    for (const form of root.querySelectorAll("form.decide")) {
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        const button = event.submitter;
        const action = (button && button.getAttribute("formaction")) || form.action;
        const error = form.querySelector(".error");
        const buttons = form.querySelectorAll("button");
        buttons.forEach((b) => (b.disabled = true));
        try {
          const response = await fetch(action, {
            method: "POST",
            headers: { "Accept": "application/json", "X-CSRF-Token": csrf },
            body: new URLSearchParams(new FormData(form)),
            credentials: "same-origin",
          });
          const body = await response.json().catch(() => ({}));
          if (response.status === 401) { location.reload(); return; }
          if (!response.ok) {
            error.textContent = (body.error && body.error.message) || "refused (" + response.status + ")";
            error.hidden = false;
            buttons.forEach((b) => (b.disabled = false));
            return;
          }
          const card = parseCard(body.html);
          const onPending = document.getElementById("pending");
          if (onPending) {
            // Shown until the stream removes it, so the person sees what they did.
            const existing = document.getElementById(card.id);
            if (existing) existing.replaceWith(card);
            setTimeout(() => { card.remove(); updateEmpty(); }, 1500);
          } else {
            place(card);
          }
        } catch (e) {
          error.textContent = "the service could not be reached: " + e;
          error.hidden = false;
          buttons.forEach((b) => (b.disabled = false));
        }
      });
    }
  }

  async function refreshList() {
    const list = document.getElementById("pending");
    if (!list) return;
    try {
      const response = await fetch(location.href, {
        credentials: "same-origin",
        headers: { "X-Console-Background": "1" }, // not the person's activity
      });
      if (!response.ok || response.redirected) { location.reload(); return; }
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = doc.getElementById("pending");
      if (fresh) {
        list.replaceChildren(...fresh.children);
        wire(list);
        updateEmpty();
      }
    } catch (e) { /* the stream reconnects and tries again */ }
  }

  function listen(section) {
    if (!window.EventSource) return;
    const live = document.getElementById("live");
    const watched = section.dataset.id; // an approval's page follows that one approval
    let opened = 0;
    const source = new EventSource(section.dataset.events);
    source.addEventListener("hello", () => {
      opened += 1;
      if (live) live.hidden = false;
      if (opened > 1) refreshList(); // events may have been missed while away
    });
    source.addEventListener("approval", (message) => {
      const data = JSON.parse(message.data);
      if (watched && data.id !== watched) return;
      place(parseCard(data.html));
    });
    source.addEventListener("resync", refreshList);
    source.addEventListener("signed-out", () => { source.close(); location.reload(); });
    source.onerror = () => { if (live) live.hidden = true; };
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire(document);
    tick();
    setInterval(tick, 1000);
    const section = document.querySelector("[data-events]");
    if (section) listen(section);
  });
})();
