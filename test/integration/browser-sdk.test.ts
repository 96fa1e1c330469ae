// The client SDK in a real browser: headless Debian Chromium (driven by
// playwright-core) loads test/browser/index.html and the SDK bundle made by
// scripts/bundle-sdk.ts (no Node polyfills), served from this process on an
// ephemeral loopback port. The page reaches a real daemon (test/helpers/daemon.ts)
// through a relay in this process that plays the app's backend: it accepts the
// browser's WebSocket, opens its own to the vault with the tenant token, and
// forwards text frames both ways, recording them, so the test also checks what
// a backend sees. scripts/setup installs chromium; without it the file skips
// loudly, and under CI it fails instead.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { createServer, type Server } from 'node:http';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import WebSocket, { WebSocketServer } from 'ws';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { bundleSdk } from '../../scripts/bundle-sdk.js';
import { readVaultKey } from '../../client/cli.js';
import { startDaemon, ROOT, type RunningDaemon } from '../helpers/daemon.js';

const CHROMIUM = '/usr/bin/chromium';
// From the machine notes: without the background-networking flags Chromium
// keeps dialling out, and this machine's closed network refuses it many times over.
const FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const haveChromium = existsSync(CHROMIUM);
if (!haveChromium) {
  const why = `${CHROMIUM} not found: the real-browser SDK test cannot run. ./scripts/setup installs Debian's chromium.`;
  if (process.env.CI) throw new Error(why); // CI runs scripts/setup, so a missing browser there is a broken setup, not a skip
  console.warn(`\n*** SKIPPING test/integration/browser-sdk.test.ts: ${why} ***\n`);
}

/** What window.bkvRun (test/browser/index.html) reports. */
interface Refusal {
  refused: boolean;
  isVaultError?: boolean;
  code?: string;
  attemptsLeft?: number;
  message?: string;
}
interface Steps {
  /** Milliseconds each step took in the page (for people reading a slow run; not asserted). */
  ms: Record<string, number>;
  browser: { userAgent: string; nodeGlobals: boolean };
  pinnedKey: { length: number; hex: string };
  descriptor: { vaultId: string; attemptLimit: number };
  backup: { generation: number; attemptLimit: number; keyHex: string; fileBytes: number; backupBytes: number; magic: string; expectedMagic: string; chunkSize: number };
  restore: { keyHex: string; bytes: number; identical: boolean };
  wrongPassword: Refusal[];
  statusAfterWrong: unknown;
  wrongBackupKey: Refusal;
  restoreAgain: { identical: boolean };
  statusAfterRight: unknown;
}

interface Frame {
  dir: 'to-vault' | 'to-browser';
  text: string;
}

/** The app's backend: adds the tenant token the browser must never hold, forwards frames, keeps a copy. */
function relayTo(d: RunningDaemon, frames: Frame[]) {
  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });
  // Close codes a peer may send on (1005/1006 are only ever reported, never sent).
  const sendable = (code: number) => (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) || (code >= 3000 && code <= 4999);
  wss.on('connection', (browser) => {
    const vault = new WebSocket(d.url, { headers: { authorization: `Bearer ${d.token}` } });
    const queued: string[] = [];
    browser.on('message', (data, binary) => {
      if (binary) return browser.close(1003);
      const text = data.toString();
      frames.push({ dir: 'to-vault', text });
      if (vault.readyState === WebSocket.OPEN) vault.send(text);
      else queued.push(text);
    });
    vault.on('open', () => queued.splice(0).forEach((t) => vault.send(t)));
    vault.on('message', (data) => {
      const text = data.toString();
      frames.push({ dir: 'to-browser', text });
      browser.send(text);
    });
    vault.on('close', (code) => browser.close(sendable(code) ? code : 1011));
    vault.on('error', () => browser.close(1011));
    browser.on('close', () => vault.close());
  });
  return wss;
}

describe.skipIf(!haveChromium)('the SDK bundle in headless Chromium, through a relay, against a real vault', () => {
  let d: RunningDaemon;
  let server: Server;
  let context: BrowserContext;
  let profile: string;
  let page: Page;
  const frames: Frame[] = [];
  const pageErrors: string[] = [];
  let bundleInputs: string[] = [];

  beforeAll(async () => {
    const bundled = bundleSdk(); // alongside the daemon's start
    bundled.catch(() => {}); // awaited below; this only keeps a failure during startDaemon from going unhandled
    d = await startDaemon();
    const bundle = await bundled;
    bundleInputs = bundle.inputs;
    const html = readFileSync(join(ROOT, 'test/browser/index.html'), 'utf8');
    const vaultKeyPem = readFileSync(d.vaultKeyFile, 'utf8');
    const wss = relayTo(d, frames);
    server = createServer((req, res) => {
      const send = (type: string, body: string) => res.writeHead(200, { 'content-type': type, 'cache-control': 'no-store' }).end(body);
      if (req.url === '/') send('text/html; charset=utf-8', html);
      else if (req.url === '/bkv-sdk.js') send('text/javascript; charset=utf-8', bundle.code);
      else if (req.url === '/vault-key.pub') send('application/x-pem-file', vaultKeyPem);
      else if (req.url === '/favicon.ico') res.writeHead(204).end(); // or Chromium logs a 404 as a console error
      else res.writeHead(404).end();
    });
    server.on('upgrade', (req, socket, head) => {
      if (req.url !== '/vault') return socket.destroy();
      wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
    });
    server.on('close', () => wss.close());
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    profile = mkdtempSync(join(tmpdir(), 'bkv-chromium-'));
    context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, headless: true, args: FLAGS });
    page = context.pages()[0] ?? (await context.newPage());
    page.on('pageerror', (e) => pageErrors.push(e.message));
    page.on('console', (m) => {
      if (m.type() === 'error') pageErrors.push(m.text());
    });
  });

  afterAll(async () => {
    await context?.close();
    await new Promise((r) => (server ? server.close(r) : r(undefined)));
    if (profile) rmSync(profile, { recursive: true, force: true });
    await d?.cleanup();
  });

  it('creates a backup, restores it, and counts wrong passwords down, all in the browser', async () => {
    const { port } = server.address() as AddressInfo;
    await page.goto(`http://127.0.0.1:${port}/`);
    await page.waitForSelector('body[data-ready="yes"]', { timeout: 10_000 }).catch(() => {
      throw new Error(`the page did not load the SDK bundle: ${pageErrors.join('; ') || 'no error reported'}`);
    });

    const userId = `browser-${randomBytes(4).toString('hex')}`;
    const password = `correct horse ${randomBytes(6).toString('hex')}`;
    const wrongPassword = `wrong horse ${randomBytes(6).toString('hex')}`;
    const fileBytes = 100_000;
    const chunkSize = 4096;
    const s = (await page.evaluate(
      (args) => (window as unknown as { bkvRun(a: typeof args): Promise<unknown> }).bkvRun(args),
      { userId, password, wrongPassword, fileBytes, chunkSize },
    ).catch((e: Error) => {
      // Page stack frames point at http://127.0.0.1:port/, which vitest would try to read as a file.
      throw new Error(`the page failed: ${e.message.replace(/https?:\/\/127\.0\.0\.1:\d+\//g, 'page:/')}`);
    })) as Steps;
    expect(pageErrors).toEqual([]);

    // It really ran in Chromium, with no Node globals to lean on.
    expect(s.browser.userAgent).toMatch(/HeadlessChrome|Chrome\//);
    expect(s.browser.nodeGlobals).toBe(false);

    // The key the page pinned from the published PEM is the vault's.
    expect(s.pinnedKey.hex).toBe(Buffer.from(readVaultKey(d.vaultKeyFile)).toString('hex'));
    expect(s.descriptor.attemptLimit).toBe(10);

    // Backup: enrolled, and the file sealed in the BKV1 format, several chunks.
    expect(s.backup).toMatchObject({ generation: 1, attemptLimit: 10, fileBytes, magic: 'BKV1', expectedMagic: 'BKV1', chunkSize });
    const chunks = Math.ceil(fileBytes / chunkSize);
    expect(s.backup.backupBytes).toBe(58 + fileBytes + chunks * 16);

    // Restore: the same K came back through the vault, and the same bytes out of the file.
    expect(s.restore).toEqual({ keyHex: s.backup.keyHex, bytes: fileBytes, identical: true });

    // Wrong passwords: a VaultError each, attempts left counting down.
    const wrong = s.wrongPassword;
    expect(wrong).toHaveLength(2);
    expect(wrong[0]).toMatchObject({ refused: true, isVaultError: true, code: 'WRONG_PASSWORD', attemptsLeft: 9 });
    expect(wrong[1]).toMatchObject({ refused: true, isVaultError: true, code: 'WRONG_PASSWORD', attemptsLeft: 8 });
    expect(wrong[1]!.message).toMatch(/8 attempts left/);
    expect(s.statusAfterWrong).toEqual({ userId, state: 'active', attemptsLeft: 8, attemptLimit: 10 });

    // A wrong backup key is named as such, not as corruption.
    expect(s.wrongBackupKey).toMatchObject({ refused: true, isVaultError: true, code: 'DECRYPT_FAILED', message: 'wrong backup key' });

    // The right password still works and gives the attempts back.
    expect(s.restoreAgain).toEqual({ identical: true });
    expect(s.statusAfterRight).toMatchObject({ state: 'active', attemptsLeft: 10 });

    // The relay saw a backend's share and no more: every method went through it...
    const toVault = frames.filter((f) => f.dir === 'to-vault').map((f) => JSON.parse(f.text) as { method: string });
    expect(new Set(toVault.map((f) => f.method))).toEqual(
      new Set(['vault.descriptor', 'enroll.begin', 'enroll.finish', 'recover.begin', 'recover.finish', 'record.status']),
    );
    // ...but no password, no K in any spelling, and no outcome of a guess (those travel in the channel).
    const wire = frames.map((f) => f.text).join('\n');
    const k = Buffer.from(s.backup.keyHex, 'hex');
    for (const secret of [password, wrongPassword, k.toString('hex'), k.toString('base64'), k.toString('base64url')]) {
      expect(wire.includes(secret), `relay saw ${secret.slice(0, 5)}…`).toBe(false);
    }
    expect(wire).not.toMatch(/WRONG_PASSWORD|wrong-password/);

    // The bundle the page ran is the SDK's own code, with no `ws` and no Node shim in it.
    expect(bundleInputs).toContain('client/sdk.ts');
    expect(bundleInputs.filter((i) => /node_modules\/(ws|buffer|events|process|crypto-browserify)\//.test(i))).toEqual([]);
  });
});
