// wss:// with a configured certificate, and plain ws:// refused off loopback.
import { describe, it, expect } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';
import { loadConfig } from '../../vault/config.js';
import { initVault } from '../../vault/setup.js';
import { startDaemon, devToken } from '../../vault/daemon.js';
import { captureLog } from '../helpers/vault.js';
import { VaultError } from '../../protocol/errors.js';

describe('transport security', () => {
  it('serves wss:// with the configured certificate and refuses plain ws:// on a non-loopback address', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bkv-tls-'));
    const cert = join(dir, 'cert.pem');
    const key = join(dir, 'key.pem');
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert,
    ], { stdio: 'pipe' });
    const logs: string[] = [];
    const log = captureLog(logs);
    const base = { dataDir: join(dir, 'data'), listen: { host: '127.0.0.1', port: 0 } };
    const c = loadConfig({ env: {}, overrides: { ...base, tls: { certFile: cert, keyFile: key } } });
    await initVault(c, log);
    const d = await startDaemon(c, log);
    try {
      const token = await devToken(d, c, log);
      const reply = await new Promise<{ result?: { status: string } }>((resolve, reject) => {
        const ws = new WebSocket(`wss://127.0.0.1:${d.server.port}`, { ca: readFileSync(cert), headers: { authorization: `Bearer ${token}` } });
        ws.on('open', () => ws.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'health', params: {} })));
        ws.on('message', (m) => {
          resolve(JSON.parse(m.toString()));
          ws.close();
        });
        ws.on('error', reject);
      });
      expect(reply.result?.status).toBe('ok');
      // The same certificate check a client does: an unknown CA is refused.
      const refused = await new Promise<string>((resolve) => {
        const ws = new WebSocket(`wss://127.0.0.1:${d.server.port}`, { headers: { authorization: `Bearer ${token}` } });
        ws.on('open', () => resolve('connected'));
        ws.on('error', (e) => resolve((e as NodeJS.ErrnoException).code ?? e.message));
      });
      expect(refused).toMatch(/SELF_SIGNED|UNABLE_TO_VERIFY|CERT/);
    } finally {
      await d.stop();
    }
    const open = loadConfig({ env: {}, overrides: { ...base, listen: { host: '0.0.0.0', port: 0 } } });
    let code = '';
    try {
      const d2 = await startDaemon(open, log);
      await d2.stop();
    } catch (e) {
      code = e instanceof VaultError ? e.code : String(e);
    }
    expect(code).toBe('BAD_REQUEST');
    rmSync(dir, { recursive: true, force: true });
  });
});
