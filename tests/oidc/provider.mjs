// A real OpenID Provider for the console's sign-in tests (tests/test_console_oidc.py):
// the certified `oidc-provider` package, pinned in package-lock.json and installed by
// `make interop-deps`, with its built-in development interactions (a login form taking
// any login and password; consent is granted for the console, a first party).
//
//   node provider.mjs <port>          (or OIDC_PORT); prints "ready" once listening
//
// Environment:
//   OIDC_REDIRECT_URIS   the console client's redirect URIs, comma-separated (required)
//   OIDC_CLIENT_ID       the console client's id (default mcp-policy-console)
//   OIDC_CLIENT_SECRET   its secret: a confidential client (client_secret_basic/post);
//                        unset: a public client (token_endpoint_auth_method none)
//   OIDC_ACCOUNTS        JSON {"<login>": {claims}} replacing the default accounts
//   OIDC_CLAIMS_IN       "id_token" (default): every claim of the openid scope is in the ID
//                        token (and at userinfo); "userinfo": only sub in the ID token, the
//                        rest only from the userinfo endpoint
//   OIDC_ADVERTISED_TOKEN_ENDPOINT
//                        a token endpoint the discovery document names instead of the
//                        provider's own (the tests' stand-in for a hostile or broken one)
//
// Besides the console, a second public client, "other-app", is registered with the same
// redirect URIs: another relying party of the same Provider, whose ID tokens are genuine
// but not for the console. PKCE (S256) is required of every client. The signing key is
// made afresh at each start.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import process from 'node:process';

import Provider from 'oidc-provider';

const port = Number(process.argv[2] ?? process.env.OIDC_PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node provider.mjs <port> (or OIDC_PORT)');
  process.exit(2);
}
const redirectUris = (process.env.OIDC_REDIRECT_URIS ?? '').split(',').filter(Boolean);
if (redirectUris.length === 0) {
  console.error('OIDC_REDIRECT_URIS is required');
  process.exit(2);
}
const clientId = process.env.OIDC_CLIENT_ID || 'mcp-policy-console';
const clientSecret = process.env.OIDC_CLIENT_SECRET || undefined;
const claimsIn = process.env.OIDC_CLAIMS_IN || 'id_token';
const advertisedTokenEndpoint = process.env.OIDC_ADVERTISED_TOKEN_ENDPOINT || undefined;
const OTHER_CLIENT_ID = 'other-app';

// alice may approve (the role claim says so); bob is a plain user, the person behind an
// agent, who may approve only his own agent's calls where the policy lets the caller.
const accounts = process.env.OIDC_ACCOUNTS
  ? JSON.parse(process.env.OIDC_ACCOUNTS)
  : {
      alice: { roles: ['approver'], name: 'Alice Approver' },
      bob: { roles: [], name: 'Bob User' },
    };

const issuer = `http://127.0.0.1:${port}`;
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-op-1', use: 'sig', alg: 'RS256' };

const client = {
  client_id: clientId,
  redirect_uris: redirectUris,
  grant_types: ['authorization_code'],
  response_types: ['code'],
  ...(clientSecret
    ? { client_secret: clientSecret, token_endpoint_auth_method: 'client_secret_basic' }
    : { token_endpoint_auth_method: 'none' }),
};

const otherClient = {
  client_id: OTHER_CLIENT_ID,
  redirect_uris: redirectUris,
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'none',
};
const CLAIMS = ['sub', 'name', 'roles', 'mcp_policy_servers', 'mcp_policy_tools'];

const provider = new Provider(issuer, {
  clients: [client, otherClient],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  pkce: { required: () => true },
  // The claims the openid scope carries; with conformIdTokenClaims off they are all put
  // in the ID token (not only at the userinfo endpoint), unless OIDC_CLAIMS_IN says not.
  claims: { openid: CLAIMS },
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true }, userinfo: { enabled: true } },
  // Any login signs in (the development form's way); only the accounts above have claims.
  async findAccount(ctx, sub) {
    return {
      accountId: sub,
      async claims(use) {
        if (use === 'id_token' && claimsIn === 'userinfo') return { sub };
        return { sub, ...(Object.hasOwn(accounts, sub) ? accounts[sub] : {}) };
      },
    };
  },
  // The clients are first parties: their grant is given at sign-in, without a consent page.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid');
    grant.addOIDCClaims(CLAIMS);
    await grant.save();
    return grant;
  },
  // Errors as plain text: the default page fetches a web font.
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><title>error</title><pre>${JSON.stringify(out)
      .replaceAll('&', '&amp;').replaceAll('<', '&lt;')}</pre>`;
  },
});
provider.on('server_error', (ctx, error) => console.error('server_error', error));
if (advertisedTokenEndpoint) {
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/.well-known/openid-configuration' && ctx.body) {
      ctx.body = { ...ctx.body, token_endpoint: advertisedTokenEndpoint };
    }
  });
}

const server = provider.listen(port, '127.0.0.1', () => {
  console.log('ready');
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
