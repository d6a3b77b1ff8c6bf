// Page checks run in the browser by tests/src/browser.rs (Browser::a11y_problems with argument
// "a11y", Browser::overflow_problems with "overflow"): the body of a function returning a list
// of problems, one string each, naming the element. A smoke check, not a full audit.
const mode = arguments[0];
const problems = [];

// "tag#id" or "tag.class.class", then the start of its text.
const describe = (el) => {
  let s = el.tagName.toLowerCase();
  if (el.id) {
    s += '#' + el.id;
  } else if (el.classList && el.classList.length) {
    s += '.' + Array.from(el.classList).slice(0, 3).join('.');
  }
  const text = (el.innerText || el.textContent || el.getAttribute('value') || '')
    .trim()
    .replace(/\s+/g, ' ');
  if (text) s += ' "' + (text.length > 40 ? text.slice(0, 40) + '…' : text) + '"';
  return s;
};

// Laid out and not hidden (display: none has no boxes; the content of a closed <details> is
// skipped by content-visibility, which only checkVisibility sees).
const rendered = (el) => {
  if (el.getClientRects().length === 0) return false;
  if (el.checkVisibility && !el.checkVisibility({ visibilityProperty: true, contentVisibilityAuto: true })) {
    return false;
  }
  const cs = getComputedStyle(el);
  return cs.visibility !== 'hidden' && cs.visibility !== 'collapse';
};

// Text of an element without that of form controls inside it (a wrapping label).
const ownLabelText = (el) => {
  const copy = el.cloneNode(true);
  copy.querySelectorAll('input, select, textarea, button').forEach((c) => c.remove());
  return copy.textContent.trim();
};

const labelledBy = (el) =>
  (el.getAttribute('aria-labelledby') || '')
    .split(/\s+/)
    .filter(Boolean)
    .map((id) => document.getElementById(id))
    .some((l) => l && l.textContent.trim());

const ariaLabel = (el) => (el.getAttribute('aria-label') || '').trim() !== '';

function a11y() {
  const html = document.documentElement;
  if (!(html.getAttribute('lang') || '').trim()) problems.push('<html> has no lang attribute');
  if (!document.title.trim()) problems.push('the page has no <title>');

  // Form fields: an accessible name from a label, aria-label or aria-labelledby.
  const skipTypes = ['hidden', 'submit', 'button', 'reset', 'image'];
  for (const el of document.querySelectorAll('input, select, textarea')) {
    const type = (el.getAttribute('type') || '').toLowerCase();
    if (el.tagName === 'INPUT' && skipTypes.includes(type)) continue;
    if (!rendered(el)) continue;
    const labelled = Array.from(el.labels || []).some((l) => ownLabelText(l));
    if (labelled || ariaLabel(el) || labelledBy(el)) continue;
    problems.push(
      describe(el) + ': form field without an accessible name (no <label>, aria-label or aria-labelledby)'
    );
  }

  // Headings: exactly one h1, no skipped levels going down.
  const headings = Array.from(document.querySelectorAll('h1, h2, h3, h4, h5, h6')).filter(rendered);
  const h1s = headings.filter((h) => h.tagName === 'H1');
  if (h1s.length !== 1) {
    problems.push(
      h1s.length + ' <h1> elements, expected exactly one' +
        (h1s.length ? ': ' + h1s.map(describe).join(', ') : '')
    );
  }
  let previous = 0;
  for (const h of headings) {
    const level = Number(h.tagName[1]);
    if (previous && level > previous + 1) {
      problems.push(describe(h) + ': heading level skipped (h' + previous + ' → h' + level + ')');
    }
    previous = level;
  }

  // Images: alt (empty for decoration).
  for (const img of document.querySelectorAll('img:not([alt])')) {
    problems.push(describe(img) + ' (src ' + img.getAttribute('src') + '): image without alt');
  }

  // Buttons and links: a name.
  const controls = document.querySelectorAll(
    'button, a[href], [role="button"], [role="link"], input[type="submit"], input[type="button"], input[type="reset"]'
  );
  for (const el of controls) {
    if (!rendered(el)) continue;
    const text = (el.innerText || '').trim();
    const value = el.tagName === 'INPUT' && (el.type === 'submit' || el.type === 'reset' || (el.value || '').trim());
    const imgAlt = Array.from(el.querySelectorAll('img[alt]')).some((i) => i.alt.trim());
    if (text || value || imgAlt || ariaLabel(el) || labelledBy(el)) continue;
    problems.push(describe(el) + ': ' + (el.tagName === 'A' ? 'link' : 'button') + ' without text or aria-label');
  }

  // Contrast of text against its background.
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 1;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const parse = (color) => {
    const m = /^rgba?\(([^)]*)\)$/.exec(color);
    if (m) {
      const p = m[1].split(/[\s,\/]+/).filter(Boolean).map(parseFloat);
      return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
    }
    // Other notations (color(), oklch(), ...): let the canvas convert to sRGB.
    ctx.clearRect(0, 0, 1, 1);
    ctx.fillStyle = color;
    ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return { r: d[0], g: d[1], b: d[2], a: d[3] / 255 };
  };
  const over = (top, bottom) => ({
    r: top.r * top.a + bottom.r * (1 - top.a),
    g: top.g * top.a + bottom.g * (1 - top.a),
    b: top.b * top.a + bottom.b * (1 - top.a),
    a: 1,
  });
  const luminance = (c) => {
    const lin = (v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    };
    return 0.2126 * lin(c.r) + 0.7152 * lin(c.g) + 0.0722 * lin(c.b);
  };
  const css = (c) => 'rgb(' + [c.r, c.g, c.b].map(Math.round).join(', ') + ')';
  // The background behind el: translucent layers up to the first opaque one (white if none);
  // null where a background image is involved (not judged).
  const background = (el) => {
    const layers = [];
    for (let n = el; n; n = n.parentElement) {
      const cs = getComputedStyle(n);
      if (cs.backgroundImage && cs.backgroundImage !== 'none') return null;
      const bg = parse(cs.backgroundColor);
      if (bg.a > 0) {
        layers.push(bg);
        if (bg.a >= 1) break;
      }
    }
    let result = { r: 255, g: 255, b: 255, a: 1 };
    for (const layer of layers.reverse()) result = over(layer, result);
    return result;
  };
  const skipTags = ['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE', 'TITLE', 'OPTION', 'OPTGROUP'];
  for (const el of document.body ? document.body.querySelectorAll('*') : []) {
    if (skipTags.includes(el.tagName)) continue;
    const ownText = Array.from(el.childNodes).some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
    if (!ownText || !rendered(el)) continue;
    const rect = el.getBoundingClientRect();
    if (rect.width <= 1 || rect.height <= 1) continue; // visually hidden (screen readers only)
    const cs = getComputedStyle(el);
    const bg = background(el);
    if (!bg) continue;
    const fg = over(parse(cs.color), bg);
    const l1 = luminance(fg);
    const l2 = luminance(bg);
    const ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
    const size = parseFloat(cs.fontSize);
    const bold = parseInt(cs.fontWeight, 10) >= 700;
    const large = size >= 24 || (bold && size >= 18.66);
    const needed = large ? 3 : 4.5;
    if (ratio < needed) {
      problems.push(
        describe(el) + ': contrast ' + ratio.toFixed(2) + ':1, below ' + needed + ':1 (text ' + css(fg) +
          ' on ' + css(bg) + ', ' + size + 'px' + (bold ? ' bold' : '') + ')'
      );
    }
  }
  return problems;
}

function overflow() {
  const vw = window.innerWidth;
  const sw = document.documentElement.scrollWidth;
  if (sw <= vw + 1) return problems;
  problems.push('the page scrolls sideways at ' + vw + 'px: it is ' + sw + 'px wide');
  // Inside a box that scrolls or clips sideways, sticking out does not widen the page.
  const contained = (el) => {
    for (let n = el.parentElement; n && n !== document.body && n !== document.documentElement; n = n.parentElement) {
      if (getComputedStyle(n).overflowX !== 'visible') return true;
    }
    return false;
  };
  const wide = [];
  for (const el of document.body ? document.body.querySelectorAll('*') : []) {
    const r = el.getBoundingClientRect();
    const left = r.left + window.scrollX;
    const right = r.right + window.scrollX;
    if ((right > vw + 1 || left < -1) && r.width > 0 && !contained(el)) wide.push({ el, r, left, right });
  }
  wide.sort((a, b) => b.r.width - a.r.width);
  for (const w of wide.slice(0, 5)) {
    problems.push(
      describe(w.el) + ': ' + Math.round(w.r.width) + 'px wide, from x=' + Math.round(w.left) + ' to ' + Math.round(w.right)
    );
  }
  return problems;
}

return mode === 'overflow' ? overflow() : a11y();
