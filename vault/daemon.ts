// Assembles a serving vault: HSM keys, store, core, channels, auth, limits and
// the WebSocket server, and tears them down in the reverse order on a signal.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { openVault } from './core/open.js';
import { ChannelTable } from './rpc/channels.js';
import { Authenticator, mintToken } from './rpc/auth.js';
import { RateLimiter } from './rpc/ratelimit.js';
import { methodTable } from './rpc/methods.js';
import { startServer, type RunningServer, type RequestEvent } from './rpc/server.js';
import { tokenConfig } from './setup.js';
import type { Config } from './config.js';
import type { Vault } from './core/vault.js';
import { toHex } from './protocol/bytes.js';

export function makeLogger(c: Config): Logger {
  return pino({
    level: c.log.level,
    base: { svc: 'bkv-vault' },
    // Defence in depth: nothing secret is ever logged on purpose, but should a
    // future change pass a request object, these paths are blanked.
    redact: { paths: ['req.headers.authorization', '*.password', '*.authKey', '*.pin', '*.token', '*.envelope'], censor: '[redacted]' },
  });
}

export interface Daemon {
  vault: Vault;
  server: RunningServer;
  auth: Authenticator;
  stop(): Promise<void>;
}

export async function startDaemon(c: Config, log: Logger, hooks: { onRequest?: (e: RequestEvent) => void } = {}): Promise<Daemon> {
  const vault = await openVault({
    hsm: tokenConfig(c),
    dbPath: c.dbPath ?? join(c.dataDir, 'vault.db'),
    log,
    vault: {
      attemptLimit: c.vault.attemptLimit,
      sessionTtlMs: c.vault.sessionTtlSec * 1000,
      kdfFloor: { alg: 'argon2id', ...c.vault.kdfFloor },
    },
  });
  const now = vault.options.now;
  const channels = new ChannelTable(vault, {
    ttlMs: c.vault.sessionTtlSec * 1000,
    freshnessMs: 60_000,
    maxChannels: 100_000,
    now,
    onInternalError: (e) => log.error({ event: 'channel.internal', err: (e as Error)?.message }, 'internal error'),
  });
  const auth = new Authenticator({
    vaultId: vault.vaultId,
    isActive: (n, v) => vault.store.tenants.isActive(n, v),
    deriveSecret: (input) => vault.keys.tenantSecret(input),
    now,
    maxLifetimeSec: c.limits.tokenMaxLifetimeSec,
  });
  const limiter = new RateLimiter(
    {
      tenant: { perSec: c.limits.tenantPerSec, burst: c.limits.tenantBurst },
      user: { perSec: c.limits.userPerMin / 60, burst: c.limits.userBurst },
    },
    now,
  );
  const server = await startServer(
    { auth, limiter, methods: methodTable(vault, channels), log, now, ...(hooks.onRequest ? { onRequest: hooks.onRequest } : {}) },
    {
      host: c.listen.host,
      port: c.listen.port,
      ...(c.tls ? { tls: { cert: readFileSync(c.tls.certFile), key: readFileSync(c.tls.keyFile) } } : {}),
      maxPayload: c.limits.maxPayloadBytes,
      maxInFlight: c.limits.maxInFlight,
      idleMs: c.limits.idleSec * 1000,
      drainMs: 10_000,
    },
  );
  vault.startSweeper();
  const sweep = setInterval(() => channels.sweep(), 1000);
  sweep.unref();
  log.info(
    { event: 'listening', host: c.listen.host, port: server.port, tls: !!c.tls, vaultId: toHex(vault.vaultId) },
    `vault listening on ${c.tls ? 'wss' : 'ws'}://${c.listen.host}:${server.port}`,
  );
  let stopped: Promise<void> | undefined;
  return {
    vault,
    server,
    auth,
    stop: () =>
      (stopped ??= (async () => {
        await server.close();
        clearInterval(sweep);
        vault.close();
        vault.store.close();
        vault.keys.close();
        log.info({ event: 'stopped' }, 'vault stopped');
      })()),
  };
}

/** The development tenant (`--dev`): created once, and a fresh 24 h token written to the data folder. */
export async function devToken(d: Daemon, c: Config, log: Logger): Promise<string> {
  const tenants = d.vault.store.tenants;
  let dev = tenants.list().find((t) => t.name === 'dev' && t.state === 'active');
  if (!dev) {
    tenants.add('dev', Date.now());
    dev = tenants.list().find((t) => t.name === 'dev' && t.state === 'active')!;
    log.info({ event: 'tenant.add', tenant: 'dev', version: dev.version }, 'development tenant created');
  }
  const secret = await d.auth.secretFor('dev', dev.version);
  const token = mintToken(secret, { tenant: 'dev', version: dev.version, vaultId: d.vault.vaultId, ttlSec: 86_400 });
  writeFileSync(join(c.dataDir, 'dev-token'), token + '\n', { mode: 0o600 });
  return token;
}
