// The admin listener: plain HTTP, loopback by default, separate from the
// public WebSocket port so it is never exposed by accident with it.
//
//   GET  /healthz                 alive (no auth)
//   GET  /readyz                  200 ready / 503 not ready, with the failing check (no auth;
//                                 evaluated at most once a second, health.ts cachedReadiness)
//   GET  /metrics                 Prometheus text (no auth; nothing per-user in it; rendered
//                                 at most once a second)
//   GET  /admin/status            ┐
//   POST /admin/rotate            │ bkv-admin while the daemon owns the HSM token:
//   GET  /admin/tenants           │ Authorization: Bearer <contents of <data>/admin-token>,
//   POST /admin/tenants           │ a random value the daemon writes at every start
//   POST /admin/tenants/revoke    │ (mode 0600), so only who can read the data folder
//   POST /admin/tenants/token     │ can act. Served only when the listener is on
//   POST /admin/audit/checkpoint  │ loopback: over a network the token would travel in clear.
//   POST /admin/ceremony/export   ┘ (key ceremony: a bundle for a trusted target, vault/ceremony/)
//
// Every request without a valid admin token (health, metrics, refused admin calls) is
// rate-limited per client address: past the limit it gets 429 with Retry-After. A flood
// of them raised the vault's RPC p50 from 6 ms to 138-215 ms, and each /readyz used to
// write to the database (docs/SECURITY.md F11).
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { timingSafeEqual } from 'node:crypto';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, ERRORS, errorSpec } from '../../protocol/errors.js';
import type { Metrics } from '../metrics.js';
import { RateLimiter, type Rate } from '../rpc/ratelimit.js';
import type { Readiness } from './health.js';
import type { StatusReport } from './status.js';

export interface AdminActions {
  status(): Promise<StatusReport>;
  /** `waitSec`: a cohort node's wait for the other nodes to import and destroy (cohort/keyring.ts). */
  rotate(opts: { resume: boolean; batchSize?: number; waitSec?: number }, onProgress: (done: number, remaining: number) => void): Promise<unknown>;
  tenants(): unknown;
  addTenant(name: string): Promise<{ name: string; version: number; secret: string }>;
  /** Every active version, or only `version`; resolves once the revoked connections are closed. */
  revokeTenant(name: string, version?: number): Promise<{ name: string; revoked: number; connectionsClosed: number }>;
  mintTenantToken(name: string, ttlSec: number, sub?: string): Promise<{ name: string; version: number; token: string; expiresAt: string }>;
  checkpoint(): Promise<{ checkpointed: boolean; seq: number; signedThrough: number }>;
  ceremonyExport(targetFile: string, epoch: number | undefined): Promise<{ bundle: string; kind: string; labels: string[] }>;
}

export interface AdminServerDeps {
  metrics: Metrics;
  readiness(): Promise<Readiness>;
  actions: AdminActions;
  adminToken: string;
  log: Logger;
  /** Requests without the admin token, per client address (default 20/s, bursts of 50). */
  unauthenticatedRate?: Rate;
  now?: () => number;
}

export const UNAUTHENTICATED_RATE: Rate = { perSec: 20, burst: 50 };
/** How long a rendered /metrics text is served again. */
const METRICS_TTL_MS = 1000;

export interface RunningAdmin {
  port: number;
  host: string;
  close(): Promise<void>;
}

export const isLoopback = (host: string): boolean => host === 'localhost' || host === '::1' || /^127\./.test(host);

function send(res: ServerResponse, status: number, body: unknown, type = 'application/json'): void {
  const text = type === 'application/json' ? JSON.stringify(body) + '\n' : String(body);
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function sendError(res: ServerResponse, e: unknown): void {
  const err = e instanceof VaultError ? e : new VaultError(ErrorCodes.INTERNAL, 'internal error');
  if (err.code === ErrorCodes.RATE_LIMITED) res.setHeader('retry-after', String(Math.max(1, Math.ceil(Number(err.detail?.retryAfterMs ?? 1000) / 1000))));
  send(res, (errorSpec(err.code) ?? ERRORS.INTERNAL).http, { error: { code: err.code, message: err.message } });
}

async function readJson(req: IncomingMessage, limit = 64 * 1024): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > limit) throw new VaultError(ErrorCodes.PAYLOAD_TOO_LARGE, 'request body over 64 KiB');
    chunks.push(c as Buffer);
  }
  if (size === 0) return {};
  try {
    const v = JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
    if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'request body must be a JSON object');
  }
}

const str = (v: unknown, name: string): string => {
  if (typeof v !== 'string' || v.length === 0 || v.length > 128) throw new VaultError(ErrorCodes.BAD_REQUEST, `${name} must be a non-empty string`);
  return v;
};
const int = (v: unknown, name: string, min: number, max: number): number => {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new VaultError(ErrorCodes.BAD_REQUEST, `${name} must be an integer in ${min}..${max}`);
  return v;
};

export async function startAdminServer(deps: AdminServerDeps, opts: { host: string; port: number }): Promise<RunningAdmin> {
  const adminEnabled = isLoopback(opts.host);
  if (!adminEnabled) {
    deps.log.warn({ event: 'admin.remote', host: opts.host }, 'admin listener is not on loopback: serving health and metrics only, no admin actions');
  }
  const expected = Buffer.from(deps.adminToken);

  const authorized = (req: IncomingMessage): boolean => {
    const h = req.headers.authorization;
    const got = Buffer.from(h?.startsWith('Bearer ') ? h.slice(7).trim() : '');
    return got.length === expected.length && timingSafeEqual(got, expected);
  };
  const now = deps.now ?? Date.now;
  const rate = deps.unauthenticatedRate ?? UNAUTHENTICATED_RATE;
  const limiter = new RateLimiter({ tenant: rate, user: rate }, now);
  // One rendering serves every scrape for a second; a readiness evaluation sets the bkv_ready gauges, so it starts a new one.
  let metricsText: { at: number; text: Promise<string> } | undefined;
  let lastReady: unknown;
  const metricsNow = (): Promise<string> => {
    const t = now();
    if (!metricsText || t - metricsText.at >= METRICS_TTL_MS) {
      const text = deps.metrics.text();
      const entry = { at: t, text };
      metricsText = entry;
      text.catch(() => {
        if (metricsText === entry) metricsText = undefined;
      });
    }
    return metricsText.text;
  };

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://admin');
    const path = url.pathname;
    const method = req.method ?? 'GET';
    void (async () => {
      try {
        // The admin token is the only way past the limit (bkv-admin health sends it too, so a
        // local flood cannot fail the container's health check); checking it is one comparison.
        const admin = adminEnabled && authorized(req);
        if (!admin) limiter.take(`addr:${req.socket.remoteAddress ?? '?'}`);
        if (path === '/healthz' && method === 'GET') return send(res, 200, { status: 'alive', pid: process.pid, uptimeSec: Math.round(process.uptime()) });
        if (path === '/readyz' && method === 'GET') {
          const r = await deps.readiness();
          if (r !== lastReady) {
            lastReady = r;
            for (const [k, c] of Object.entries(r.checks)) deps.metrics.ready.set({ check: k }, c.ok ? 1 : 0);
            deps.metrics.ready.set({ check: 'all' }, r.ready ? 1 : 0);
            metricsText = undefined;
          }
          return send(res, r.ready ? 200 : 503, r);
        }
        if (path === '/metrics' && method === 'GET') return send(res, 200, await metricsNow(), deps.metrics.contentType);
        if (!path.startsWith('/admin/')) throw new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no such endpoint ${path.slice(0, 64)}`);
        if (!adminEnabled) throw new VaultError(ErrorCodes.FORBIDDEN, 'admin actions are served only on a loopback listener');
        if (!admin) {
          deps.log.warn({ event: 'admin.denied', path }, 'admin request without a valid admin token');
          throw new VaultError(ErrorCodes.UNAUTHENTICATED, 'admin token missing or wrong (it is in <data>/admin-token)');
        }
        const a = deps.actions;
        const route = `${method} ${path}`;
        switch (route) {
          case 'GET /admin/status':
            return send(res, 200, await a.status());
          case 'GET /admin/tenants':
            return send(res, 200, a.tenants());
          case 'POST /admin/tenants': {
            const b = await readJson(req);
            return send(res, 200, await a.addTenant(str(b.name, 'name')));
          }
          case 'POST /admin/tenants/revoke': {
            const b = await readJson(req);
            const version = b.version === undefined ? undefined : int(b.version, 'version', 1, 999_999_999);
            return send(res, 200, await a.revokeTenant(str(b.name, 'name'), version));
          }
          case 'POST /admin/tenants/token': {
            const b = await readJson(req);
            const sub = b.sub === undefined ? undefined : str(b.sub, 'sub');
            return send(res, 200, await a.mintTenantToken(str(b.name, 'name'), int(b.ttlSec ?? 3600, 'ttlSec', 60, 10 * 365 * 86_400), sub));
          }
          case 'POST /admin/audit/checkpoint':
            return send(res, 200, await a.checkpoint());
          case 'POST /admin/ceremony/export': {
            const b = await readJson(req);
            if (typeof b.target !== 'string' || b.target.length === 0 || b.target.length > 16_384) {
              throw new VaultError(ErrorCodes.BAD_REQUEST, 'target must be the text of the target file ceremony target-init wrote');
            }
            const epoch = b.epoch === undefined ? undefined : int(b.epoch, 'epoch', 1, 999_999);
            return send(res, 200, await a.ceremonyExport(b.target, epoch));
          }
          case 'POST /admin/rotate': {
            const b = await readJson(req);
            const resume = b.resume === true;
            const batchSize = b.batchSize === undefined ? undefined : int(b.batchSize, 'batchSize', 1, 100_000);
            const waitSec = b.waitSec === undefined ? undefined : int(b.waitSec, 'waitSec', 1, 3_600);
            // Progress streams as NDJSON; the rotation itself goes on if the client disconnects.
            res.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store' });
            const line = (o: unknown) => {
              if (!res.destroyed) res.write(JSON.stringify(o) + '\n');
            };
            try {
              const result = await a.rotate({ resume, ...(batchSize ? { batchSize } : {}), ...(waitSec ? { waitSec } : {}) }, (done, remaining) => line({ progress: { done, remaining } }));
              line({ result });
            } catch (e) {
              const err = e instanceof VaultError ? e : new VaultError(ErrorCodes.INTERNAL, 'internal error');
              if (!(e instanceof VaultError)) deps.log.error({ event: 'admin.internal', route, err: (e as Error)?.message }, 'rotation failed');
              line({ error: { code: err.code, message: err.message } });
            }
            return void res.end();
          }
          default:
            throw new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no such endpoint ${route.slice(0, 80)}`);
        }
      } catch (e) {
        if (!(e instanceof VaultError)) deps.log.error({ event: 'admin.internal', path, err: (e as Error)?.message }, 'admin request failed');
        if (!res.headersSent) sendError(res, e);
        else res.end();
      }
    })();
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 0; // a rotation may stream for a long time

  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) =>
      reject(new VaultError(ErrorCodes.BAD_REQUEST, `admin listener cannot bind ${opts.host}:${opts.port}: ${(e as Error).message} (config admin.host/admin.port, env BKV_ADMIN_LISTEN)`)),
    );
    server.listen(opts.port, opts.host, () => resolve());
  });
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : opts.port;
  return {
    port,
    host: opts.host,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
