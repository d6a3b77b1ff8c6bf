// Sekisho console: the only script. It refreshes the live decisions and checks the policy
// as it is typed. The console works without it.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]');
  const token = csrf ? csrf.getAttribute("content") : "";
  // A session that ended answers with the sign-in page: show it, rather than paste it in.
  const reload = () => {
    window.location.reload();
    return Promise.reject(new Error("signed out"));
  };

  // Live decisions: the table's rows again every 3 s, with the page's own filters.
  const live = document.querySelector("table[data-live]");
  if (live && live.dataset.live) {
    const body = live.querySelector("tbody");
    const refresh = () => {
      fetch(live.dataset.live + window.location.search, { credentials: "same-origin" })
        .then((r) => (r.redirected ? reload() : r.ok ? r.text() : Promise.reject(r.status)))
        .then((html) => { body.innerHTML = html; })
        .catch(() => {});
    };
    window.setInterval(refresh, 3000);
  }

  // The policy: checked (loads, tests pass, diff) 600 ms after the last keystroke.
  const text = document.getElementById("policy-text");
  const out = document.getElementById("policy-result");
  if (text && out && !text.readOnly) {
    let timer = null;
    let asked = 0;
    text.addEventListener("input", () => {
      window.clearTimeout(timer);
      timer = window.setTimeout(() => {
        const n = ++asked;
        const form = new URLSearchParams();
        form.set("text", text.value);
        form.set("fragment", "1");
        fetch("/console/policy/check", {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": token },
          body: form.toString(),
        })
          .then((r) => (r.redirected ? reload() : r.ok ? r.text() : Promise.reject(r.status)))
          .then((html) => { if (n === asked) out.innerHTML = html; })
          .catch(() => {});
      }, 600);
    });
  }
})();
