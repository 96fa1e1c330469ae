// The browser bundle of the SDK (scripts/bundle-sdk.ts, `npm run bundle:sdk`):
// it builds with no Node polyfills, keeps `ws` out, and its check refuses a
// Node builtin planted anywhere in the import graph, naming the chain that
// reached it. test/integration/browser-sdk.test.ts runs the bundle in Chromium.
import { describe, it, expect } from 'vitest';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bundleSdk, isNodeBuiltin } from '../../scripts/bundle-sdk.js';

/** The build's error text, or a failure if it built. */
async function refusal(source: string): Promise<string> {
  try {
    await bundleSdk({ source });
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error(`bundled without complaint:\n${source}`);
}

describe('the SDK browser bundle', () => {
  it('builds from the SDK alone: no Node builtin, no polyfill, and `ws` left as the lazy import nobody in a browser reaches', async () => {
    const b = await bundleSdk();
    for (const f of ['client/browser.ts', 'client/sdk.ts', 'client/transport.ts', 'client/backup-format.ts', 'client/backup-code.ts']) {
      expect(b.inputs).toContain(f);
    }
    // Nothing of `ws` (its browser stub included) and no shim package made it in.
    expect(b.inputs.filter((i) => /node_modules\/(ws|buffer|events|process|util|stream-browserify|crypto-browserify)\//.test(i))).toEqual([]);
    expect(b.inputs.filter((i) => isNodeBuiltin(i))).toEqual([]);
    // The one import left in the bundle is transport.ts's `await import('ws')`.
    expect(b.externals).toEqual([{ path: 'ws', kind: 'dynamic-import' }]);
    expect(b.code).toMatch(/import\("ws"\)/);
  });

  it('writes the bundle and its source map where npm run bundle:sdk puts them', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bkv-bundle-'));
    try {
      const outfile = join(dir, 'bkv-sdk.js');
      const b = await bundleSdk({ outfile });
      expect(readFileSync(outfile, 'utf8')).toBe(b.code);
      expect(existsSync(`${outfile}.map`)).toBe(true);
      expect(b.code).toMatch(/export \{[^}]*\bVaultClient\b/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('the no-polyfill check', () => {
  it('refuses a planted node:crypto import and names it', async () => {
    const msg = await refusal(`export * from './browser.js';\nimport { randomBytes } from 'node:crypto';\nexport const salt = randomBytes(16);\n`);
    expect(msg).toContain('"node:crypto" is a Node builtin; the browser SDK must not import it (no polyfills)');
    expect(msg).toContain('Import chain: client/<planted>.ts → node:crypto');
    expect(msg).toMatch(/<planted>\.ts:2:\d+: ERROR/); // esbuild points at the import line
  });

  it('finds one deep in the graph and prints the chain to it', async () => {
    // channel-node.ts is the daemon's node:crypto fast path: the SDK must never reach it.
    const msg = await refusal(`export { sealMessage } from '../vault/rpc/channel-node.js';\n`);
    expect(msg).toContain('Import chain: client/<planted>.ts → vault/rpc/channel-node.ts → node:crypto');
    expect(msg).toMatch(/vault\/rpc\/channel-node\.ts:\d+:\d+: ERROR/);
  });

  it('refuses bare builtins and the polyfill packages named like them', async () => {
    for (const spec of ['crypto', 'fs/promises', 'buffer', 'events', 'node:stream/web']) {
      expect(await refusal(`import * as m from '${spec}';\nexport { m };\n`)).toContain(`"${spec}" is a Node builtin`);
    }
  });

  it('refuses `ws` anywhere but transport.ts\'s lazy import', async () => {
    expect(await refusal(`import WebSocket from 'ws';\nexport { WebSocket };\n`)).toContain('"ws" is Node-only');
    expect(await refusal(`export const load = () => import('ws');\n`)).toContain('only client/transport.ts may load it');
  });

  it('tells builtins from ordinary packages', () => {
    for (const s of ['node:crypto', 'node:test', 'crypto', 'fs', 'fs/promises', 'buffer', 'worker_threads']) expect(isNodeBuiltin(s), s).toBe(true);
    for (const s of ['@noble/hashes/sha2.js', 'zod', 'hash-wasm', 'ws', './crypto.js', 'cryptography']) expect(isNodeBuiltin(s), s).toBe(false);
  });
});
