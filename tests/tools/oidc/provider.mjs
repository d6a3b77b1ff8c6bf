// A real OpenID provider (node-oidc-provider) for Sekisho's sign-in tests.
//
// Settings: environment variables, or the same names as arguments (`--issuer URL`,
// `--listen ADDR:PORT`, `--tls-cert FILE`, ...):
//   ISSUER        the issuer, e.g. https://idp.example (default https://idp.example)
//   LISTEN        address:port to listen on (default 0.0.0.0:443; [::]:443 for IPv6)
//   TLS_CERT, TLS_KEY  PEM certificate chain and key: HTTPS is served directly. Without them
//                 the provider speaks plain HTTP (only for an http:// issuer).
//   STATE_DIR     folder for the files below (default: the current folder)
//   USERS_FILE    JSON list of {"sub","username","password","email","name","groups":[...]},
//                 read again on every use, so a test may change groups or passwords while it runs
//                 (default STATE_DIR/users.json)
//   CLIENTS_FILE  JSON list of oidc-provider client metadata (default STATE_DIR/clients.json)
//   KEYS_FILE     private JWKS that signs the ID tokens; made (one RS256 key, random kid) when
//                 absent. Keys are rotated by replacing the file and restarting the provider
//                 (default STATE_DIR/jwks.json)
//   TAMPER_FILE   when it exists and holds one of bad-signature, audience, issuer, expired, nonce,
//                 the id_token in the token endpoint's responses is rewritten to fail exactly that
//                 check (default STATE_DIR/tamper)
//
// Login and consent are real HTML pages (/interaction/:uid): a login form (fields `login` and
// `password`), then a consent form. The device flow (RFC 8628) uses the provider's own user code
// and success pages at /device. Each request is logged as "METHOD PATH STATUS"; "ready" is printed
// once the provider listens.

import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

// ---- settings --------------------------------------------------------------------------------

function settings() {
  const names = [
    'ISSUER', 'LISTEN', 'TLS_CERT', 'TLS_KEY', 'STATE_DIR', 'USERS_FILE', 'CLIENTS_FILE',
    'KEYS_FILE', 'TAMPER_FILE',
  ];
  const s = {};
  for (const n of names) s[n] = process.env[n] || undefined;
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i += 1) {
    const a = args[i];
    if (a === '-h' || a === '--help') {
      process.stdout.write(fs.readFileSync(new URL(import.meta.url), 'utf8')
        .split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n')
        .concat('\n'));
      process.exit(0);
    }
    let [name, value] = a.startsWith('--') ? a.slice(2).split(/=(.*)/s, 2) : [undefined];
    name = name?.toUpperCase().replaceAll('-', '_');
    if (!name || !names.includes(name)) {
      console.error(`provider: unknown argument ${a} (try --help)`);
      process.exit(2);
    }
    if (value === undefined) {
      i += 1;
      value = args[i];
      if (value === undefined) {
        console.error(`provider: ${a} needs a value`);
        process.exit(2);
      }
    }
    s[name] = value;
  }
  s.ISSUER ||= 'https://idp.example';
  s.LISTEN ||= '0.0.0.0:443';
  s.STATE_DIR ||= '.';
  s.USERS_FILE ||= path.join(s.STATE_DIR, 'users.json');
  s.CLIENTS_FILE ||= path.join(s.STATE_DIR, 'clients.json');
  s.KEYS_FILE ||= path.join(s.STATE_DIR, 'jwks.json');
  s.TAMPER_FILE ||= path.join(s.STATE_DIR, 'tamper');
  if (!!s.TLS_CERT !== !!s.TLS_KEY) {
    console.error('provider: TLS_CERT and TLS_KEY go together');
    process.exit(2);
  }
  return s;
}

const cfg = settings();

function log(...words) {
  process.stdout.write(`${new Date().toISOString()} ${words.join(' ')}\n`);
}

// ---- keys, users, clients --------------------------------------------------------------------

async function newSigningKey() {
  const { privateKey } = await jose.generateKeyPair('RS256', { modulusLength: 2048, extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  return { ...jwk, kid: randomBytes(12).toString('base64url'), alg: 'RS256', use: 'sig' };
}

async function loadKeys(file) {
  if (!fs.existsSync(file)) {
    const jwks = { keys: [await newSigningKey()] };
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, `${JSON.stringify(jwks, null, 2)}\n`, { mode: 0o600 });
    log(`made a signing key (kid ${jwks.keys[0].kid}) in ${file}`);
    return jwks;
  }
  const jwks = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) {
    throw new Error(`${file}: not a JWKS with keys`);
  }
  return jwks;
}

function readUsers() {
  const users = JSON.parse(fs.readFileSync(cfg.USERS_FILE, 'utf8'));
  if (!Array.isArray(users)) throw new Error(`${cfg.USERS_FILE}: expected a JSON list`);
  return users;
}

function userBySub(sub) {
  return readUsers().find((u) => u.sub === sub);
}

function userByLogin(login) {
  return readUsers().find((u) => u.username === login || u.email === login);
}

const jwks = await loadKeys(cfg.KEYS_FILE);
const clients = JSON.parse(fs.readFileSync(cfg.CLIENTS_FILE, 'utf8'));
readUsers(); // fail at start, not at the first sign-in, when the file is missing or broken

// ---- HTML ------------------------------------------------------------------------------------

const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
})[c]);

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<h1>${esc(title)}</h1>
${body}
</body></html>
`;
}

function loginPage(uid, client, params, error) {
  return page('Sign in', `<p>Sign in to continue to <strong>${esc(client?.clientName || params.client_id)}</strong>.</p>
${error ? `<p class="error" id="error">${esc(error)}</p>\n` : ''}<form method="post" action="/interaction/${esc(uid)}/login" id="login">
<label>Username <input type="text" name="login" value="${esc(params.login_hint || '')}" autofocus required></label>
<label>Password <input type="password" name="password" required></label>
<button type="submit">Sign in</button>
</form>
<form method="post" action="/interaction/${esc(uid)}/abort" id="abort"><button type="submit">Cancel</button></form>`);
}

function consentPage(uid, client, params, details) {
  const scopes = [...new Set([...(details.missingOIDCScope || []), ...(params.scope || '').split(' ')])]
    .filter(Boolean);
  return page('Allow access', `<p><strong>${esc(client?.clientName || params.client_id)}</strong> asks for: ${scopes.map(esc).join(', ')}.</p>
<form method="post" action="/interaction/${esc(uid)}/confirm" id="confirm"><button type="submit">Allow</button></form>
<form method="post" action="/interaction/${esc(uid)}/abort" id="abort"><button type="submit">Deny</button></form>`);
}

async function readForm(ctx, limit = 65536) {
  const chunks = [];
  let size = 0;
  for await (const chunk of ctx.req) {
    size += chunk.length;
    if (size > limit) ctx.throw(413, 'form too large');
    chunks.push(chunk);
  }
  return Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString('utf8')));
}

// ---- the provider ----------------------------------------------------------------------------

const provider = new Provider(cfg.ISSUER, {
  clients,
  jwks,
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  findAccount(ctx, sub) {
    const user = userBySub(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        // Read again: a test may have changed the user's groups since the sign-in.
        const u = userBySub(sub) || user;
        return {
          sub,
          preferred_username: u.username,
          name: u.name,
          email: u.email,
          email_verified: u.email !== undefined,
          groups: u.groups || [],
        };
      },
    };
  },
  responseTypes: ['code', 'none'],
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  // Claims asked for with scopes go into the ID token too (not only userinfo).
  conformIdTokenClaims: false,
  // auth_time in every ID token.
  clientDefaults: { require_auth_time: true },
  pkce: { methods: ['S256'], required: () => true },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  ttl: {
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: 3600,
    AccessToken: 3600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Sign-in error', `<div class="error">\n${Object.entries(out)
      .map(([k, v]) => `<p><strong>${esc(k)}</strong>: ${esc(v)}</p>`).join('\n')}\n</div>`);
  },
});

// Requests and errors, on stdout.
provider.use(async (ctx, next) => {
  try {
    await next();
  } catch (err) {
    log('error', ctx.method, ctx.path, err.stack || err);
    throw err;
  } finally {
    log(ctx.method, ctx.path, ctx.status);
  }
});
provider.on('server_error', (ctx, err) => log('error server_error', ctx?.path, err.stack || err));
for (const ev of ['authorization', 'grant', 'code_verification', 'device_authorization', 'device_resume',
  'discovery', 'end_session', 'introspection', 'jwks', 'revocation', 'userinfo',
  'pushed_authorization_request']) {
  provider.on(`${ev}.error`, (ctx, err) => log(`error ${ev}:`, err.error || err.name, '-',
    err.error_description || err.message, err.error_detail ? `(${err.error_detail})` : ''));
}

// ---- TAMPER_FILE: rewrite the token endpoint's id_token --------------------------------------

const TAMPER_MODES = new Set(['bad-signature', 'audience', 'issuer', 'expired', 'nonce']);
let strangerKey; // the key of bad-signature: not the provider's, but with its kid

function tamperMode() {
  let mode;
  try {
    mode = fs.readFileSync(cfg.TAMPER_FILE, 'utf8').trim();
  } catch {
    return undefined;
  }
  if (!mode) return undefined;
  if (!TAMPER_MODES.has(mode)) {
    log(`tamper: unknown mode "${mode}" in ${cfg.TAMPER_FILE} (ignored)`);
    return undefined;
  }
  return mode;
}

async function tamper(idToken, mode) {
  const header = jose.decodeProtectedHeader(idToken);
  const claims = jose.decodeJwt(idToken);
  const signer = jwks.keys.find((k) => k.kid === header.kid) || jwks.keys[0];
  let key = await jose.importJWK(signer, header.alg || 'RS256');
  const now = Math.floor(Date.now() / 1000);
  switch (mode) {
    case 'bad-signature':
      strangerKey ||= (await jose.generateKeyPair(header.alg || 'RS256')).privateKey;
      key = strangerKey;
      break;
    case 'audience':
      claims.aud = 'someone-else';
      break;
    case 'issuer':
      claims.iss = 'https://evil.example';
      break;
    case 'expired':
      // Both two hours back: the token expired an hour ago (with the 1 h ID token lifetime).
      claims.iat = (claims.iat ?? now) - 2 * 3600;
      claims.exp = Math.min((claims.exp ?? now) - 2 * 3600, now - 3600);
      break;
    case 'nonce':
      claims.nonce = 'not-the-nonce';
      break;
    default:
      return idToken;
  }
  return new jose.SignJWT(claims).setProtectedHeader(header).sign(key);
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.method !== 'POST' || ctx.path !== '/token' || ctx.status !== 200) return;
  const mode = tamperMode();
  if (!mode || !ctx.body || typeof ctx.body !== 'object' || !ctx.body.id_token) return;
  ctx.body = { ...ctx.body, id_token: await tamper(ctx.body.id_token, mode) };
  log(`tamper: id_token rewritten (${mode})`);
});

// ---- interactions: login, consent, abort -----------------------------------------------------

const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?\/?$/;

async function interaction(ctx, uid, action) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== uid) {
    throw new errors.SessionNotFound('interaction session and URL do not match');
  }
  const { prompt, params, session } = details;
  const client = await provider.Client.find(params.client_id);
  ctx.set('cache-control', 'no-store');

  const finish = async (result) => {
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, {
      mergeWithLastSubmission: !('error' in result),
    });
    ctx.status = 303;
    ctx.redirect(returnTo);
  };

  if (ctx.method === 'GET' && !action) {
    ctx.type = 'html';
    if (prompt.name === 'login') {
      ctx.body = loginPage(uid, client, params);
    } else if (prompt.name === 'consent') {
      ctx.body = consentPage(uid, client, params, prompt.details);
    } else {
      ctx.status = 400;
      ctx.body = page('Sign-in error', `<p class="error">unknown prompt ${esc(prompt.name)}</p>`);
    }
    return;
  }
  if (ctx.method !== 'POST' || !action) {
    ctx.status = 405;
    return;
  }
  const form = await readForm(ctx);

  if (action === 'abort') {
    await finish({ error: 'access_denied', error_description: 'End-User aborted interaction' });
    return;
  }

  if (action === 'login') {
    if (prompt.name !== 'login') throw new errors.InvalidRequest('this interaction is not a login');
    const user = userByLogin(form.login || '');
    if (!user || typeof user.password !== 'string' || user.password !== (form.password || '')) {
      log(`login refused for "${form.login || ''}"`);
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = loginPage(uid, client, { ...params, login_hint: form.login },
        'Invalid username or password.');
      return;
    }
    log(`login: ${user.username} (sub ${user.sub})`);
    await finish({ login: { accountId: user.sub } });
    return;
  }

  // confirm
  if (prompt.name !== 'consent') throw new errors.InvalidRequest('this interaction is not a consent');
  const { details: missing } = prompt;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  log(`consent: ${session.accountId} -> ${params.client_id} (${grant.getOIDCScope()})`);
  await finish({ consent: details.grantId ? {} : { grantId } });
}

provider.use(async (ctx, next) => {
  const m = INTERACTION.exec(ctx.path);
  if (!m) return next();
  try {
    await interaction(ctx, m[1], m[2]);
  } catch (err) {
    log('error interaction:', err.error || err.name, '-', err.error_description || err.message);
    ctx.status = err.statusCode || err.status || 500;
    ctx.type = 'html';
    ctx.body = page('Sign-in error', `<p class="error"><strong>${esc(err.error || 'server_error')}</strong>: ${esc(err.error_description || err.message)}</p>`);
  }
  return undefined;
});

// ---- listen ----------------------------------------------------------------------------------

const m = /^\[?([^\]]*)\]?:(\d+)$/.exec(cfg.LISTEN);
if (!m) {
  console.error(`provider: LISTEN must be ADDRESS:PORT, not ${cfg.LISTEN}`);
  process.exit(2);
}
const [, host, port] = m;
const server = cfg.TLS_CERT
  ? https.createServer({
    cert: fs.readFileSync(cfg.TLS_CERT),
    key: fs.readFileSync(cfg.TLS_KEY),
  }, provider.callback())
  : http.createServer(provider.callback());
server.on('error', (err) => {
  console.error(`provider: ${err.message}`);
  process.exit(1);
});
server.listen(Number(port), host, () => {
  log(`issuer ${cfg.ISSUER} on ${cfg.TLS_CERT ? 'https' : 'http'}://${cfg.LISTEN}, signing kid ${jwks.keys.map((k) => k.kid).join(',')}`);
  process.stdout.write('ready\n');
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
