// The reference peer: a plain OPAQUE (RFC 9807) login server on the vault's
// own stack — `ws` JSON-RPC, better-sqlite3 with the vault's pragmas (WAL,
// synchronous=FULL) — with its long-term keys in process memory
// (@serenity-kit/opaque, WASM). It answers the same kind of two-round-trip
// password protocol as a recovery, without an HSM, an attempt counter or a
// state anchor: what a password check costs when none of that is enforced.
//
//   node dist/bench/peer.js --data DIR
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { createServer } from 'node:http';
import Database from 'better-sqlite3';
import { WebSocketServer } from 'ws';
import * as opaque from '@serenity-kit/opaque';
import { emit, serveCommands } from './lib/proc.js';
import { corkPerTurn } from '../vault/rpc/cork.js';

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { data: { type: 'string' } } });
  mkdirSync(values.data!, { recursive: true });
  await opaque.ready;
  const db = new Database(join(values.data!, 'peer.db'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.exec('CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, record TEXT NOT NULL) STRICT');
  const getRecord = db.prepare<[string], { record: string }>('SELECT record FROM users WHERE user_id = ?');
  const putRecord = db.prepare('INSERT OR REPLACE INTO users (user_id, record) VALUES (?, ?)');
  const serverSetup = opaque.server.createSetup();
  const logins = new Map<string, { state: string; at: number }>();
  setInterval(() => {
    const old = Date.now() - 120_000;
    for (const [k, v] of logins) if (v.at < old) logins.delete(k);
  }, 5000).unref();

  const handlers: Record<string, (p: Record<string, string>) => unknown> = {
    'register.start': (p) => ({
      response: opaque.server.createRegistrationResponse({ serverSetup, userIdentifier: p.userId!, registrationRequest: p.request! }).registrationResponse,
    }),
    'register.finish': (p) => {
      putRecord.run(p.userId!, p.record!);
      return { ok: true };
    },
    'login.start': (p) => {
      const rec = getRecord.get(p.userId!)?.record;
      const r = opaque.server.startLogin({ serverSetup, userIdentifier: p.userId!, registrationRecord: rec, startLoginRequest: p.request! });
      const session = randomBytes(16).toString('base64url');
      logins.set(session, { state: r.serverLoginState, at: Date.now() });
      return { session, response: r.loginResponse };
    },
    'login.finish': (p) => {
      const s = logins.get(p.session!);
      logins.delete(p.session!);
      if (!s) throw new Error('SESSION_NOT_FOUND');
      try {
        opaque.server.finishLogin({ serverLoginState: s.state, finishLoginRequest: p.request! });
        return { ok: true };
      } catch {
        return { ok: false };
      }
    },
  };

  const http = createServer();
  const wss = new WebSocketServer({ server: http, maxPayload: 64 * 1024 });
  wss.on('connection', (ws, upgrade) => {
    // The same write batching as the vault's server (vault/rpc/cork.ts).
    const cork = corkPerTurn(upgrade.socket);
    ws.on('message', (data) => {
      let req: { id?: number; method?: string; params?: Record<string, string> };
      try {
        req = JSON.parse(data.toString());
      } catch {
        return;
      }
      let body: object;
      try {
        const h = handlers[req.method ?? ''];
        if (!h) throw new Error('BAD_REQUEST');
        body = { jsonrpc: '2.0', id: req.id, result: h(req.params ?? {}) };
      } catch (e) {
        body = { jsonrpc: '2.0', id: req.id, error: { code: -32000, message: (e as Error).message, data: { code: (e as Error).message } } };
      }
      cork();
      ws.send(JSON.stringify(body));
    });
  });
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  const addr = http.address();
  emit({ event: 'ready', port: typeof addr === 'object' && addr ? addr.port : 0, startupMs: Math.round(performance.now()) });
  let cpu0 = process.cpuUsage();
  serveCommands((cmd) => {
    if (cmd.cmd === 'stats') {
      const cpu = process.cpuUsage(cmd.resetCpu ? undefined : cpu0);
      if (cmd.resetCpu) cpu0 = process.cpuUsage();
      return { rss: process.memoryUsage().rss, cpuUserMs: cpu.user / 1000, cpuSystemMs: cpu.system / 1000 };
    }
    if (cmd.cmd === 'stop') {
      wss.close();
      http.close();
      db.close();
      setImmediate(() => process.exit(0));
      return { stopped: true };
    }
    throw new Error('unknown command');
  });
}

main().catch((e: unknown) => {
  emit({ error: (e as Error).message, fatal: true });
  process.exit(1);
});
