// WAL checkpoints on a thread of their own (vault/store/checkpointer.ts), on
// real SQLite files and a real worker thread.
import { describe, it, expect, afterEach } from 'vitest';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { Store } from '../../vault/store/index.js';
import type { StoredRecord } from '../../vault/store/records.js';
import { BACKSTOP_AUTOCHECKPOINT, Checkpointer, DEFAULT_AUTOCHECKPOINT } from '../../vault/store/checkpointer.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function tempDb(): string {
  const d = mkdtempSync(join(tmpdir(), 'bkv-ckpt-'));
  dirs.push(d);
  return join(d, 'vault.db');
}

const record = (userId: string): StoredRecord => ({
  userId,
  state: 'active',
  generation: 1,
  attempts: 0,
  attemptLimit: 10,
  verifier: new Uint8Array(randomBytes(32)),
  sealed: new Uint8Array(randomBytes(92)),
  sealEpoch: 1,
  kdf: { alg: 'argon2id', m: 65536, t: 3, p: 1 },
  createdAt: 1,
  updatedAt: 1,
});

/** Group commits as the ledger makes them: begin, puts, commit, then the log's fdatasync. */
async function writeBatches(store: Store, batches: number, perBatch: number): Promise<void> {
  for (let b = 0; b < batches; b++) {
    store.records.begin();
    for (let i = 0; i < perBatch; i++) store.records.put(record(`u-${b}-${i}`));
    store.records.commit();
    await store.records.syncWal();
  }
}

/**
 * Records readable from the database file alone, as if the log were lost; -1 when the copy
 * caught the checkpointer half-way through writing pages (a torn copy, not a torn database:
 * the next poll sees the finished pass).
 */
function rowsInMainFile(path: string): number {
  const copy = `${path}.main-only`;
  copyFileSync(path, copy);
  const db = new Database(copy);
  try {
    const hasTable = db.prepare("SELECT 1 FROM sqlite_master WHERE name = 'records'").get();
    return hasTable ? (db.prepare('SELECT count(*) AS n FROM records').get() as { n: number }).n : 0;
  } catch (e) {
    if (['SQLITE_CORRUPT', 'SQLITE_NOTADB'].includes(String((e as { code?: string }).code))) return -1;
    throw e;
  } finally {
    db.close();
    for (const f of [copy, `${copy}-wal`, `${copy}-shm`]) rmSync(f, { force: true });
  }
}

/** This process's open descriptors on the database file (Linux). */
function openFiles(path: string): string[] {
  return readdirSync('/proc/self/fd')
    .map((fd) => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        return '';
      }
    })
    .filter((target) => target === path);
}

async function until(cond: () => boolean, ms = 5000): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) if (cond()) return true;
  return cond();
}

describe('WAL checkpoints on their own thread', () => {
  it('copies committed batches into the database file soon after they are synced', async () => {
    const path = tempDb();
    const store = new Store(path, { checkpointWorker: {} });
    try {
      await writeBatches(store, 10, 100);
      // ~300 pages of log: below SQLite's own threshold, so only the worker can have copied them.
      expect(await until(() => rowsInMainFile(path) === 1000)).toBe(true);
      expect(store.records.checkpoints()).toMatchObject({ failures: 0 });
      expect(store.records.checkpoints()!.passes).toBeGreaterThanOrEqual(1);
    } finally {
      store.close();
    }
  });

  it('without the worker, the same batches stay in the log (the control for the test above)', async () => {
    const path = tempDb();
    const store = new Store(path);
    try {
      await writeBatches(store, 10, 100);
      await new Promise((r) => setTimeout(r, 500));
      expect(store.records.checkpoints()).toBeUndefined();
      expect(rowsInMainFile(path)).toBe(0);
    } finally {
      store.close();
    }
  });

  it("close() returns once the worker's connection is closed, so the serving one closes last", async () => {
    const path = tempDb();
    const store = new Store(path, { checkpointWorker: {} });
    await writeBatches(store, 2, 50);
    expect(existsSync(`${path}-wal`)).toBe(true);
    expect(await until(() => openFiles(path).length >= 2)).toBe(true); // both connections
    store.close();
    expect(openFiles(path)).toEqual([]);
    // SQLite removes the log when its last connection closes, checkpointing it first.
    expect(existsSync(`${path}-wal`)).toBe(false);
    const db = new Database(path, { readonly: true });
    expect((db.prepare('SELECT count(*) AS n FROM records').get() as { n: number }).n).toBe(100);
    db.close();
  });

  it('coalesces pokes: at most one pass per interval, and one more for what came during a pass', async () => {
    const path = tempDb();
    new Store(path).close(); // schema
    const set: number[] = [];
    const c = new Checkpointer(path, { intervalMs: 300, setAutocheckpoint: (n) => set.push(n) });
    try {
      expect(set).toEqual([BACKSTOP_AUTOCHECKPOINT]);
      for (let i = 0; i < 50; i++) c.poke();
      expect(await until(() => c.stats().passes === 2)).toBe(true);
      await new Promise((r) => setTimeout(r, 500));
      expect(c.stats()).toMatchObject({ passes: 2, failures: 0, running: false });
    } finally {
      c.close();
    }
  });

  it('a worker that cannot open the file hands checkpoints back to the serving connection', async () => {
    const set: number[] = [];
    const failures: string[] = [];
    const c = new Checkpointer(join(tmpdir(), `bkv-missing-${randomBytes(4).toString('hex')}.db`), {
      setAutocheckpoint: (n) => set.push(n),
      onFailure: (code) => failures.push(code),
    });
    expect(await until(() => failures.length > 0)).toBe(true);
    expect(failures[0]).toBe('SQLITE_CANTOPEN');
    expect(set).toEqual([BACKSTOP_AUTOCHECKPOINT, DEFAULT_AUTOCHECKPOINT]);
    c.poke(); // ignored: nothing left to run it
    expect(c.stats()).toMatchObject({ passes: 0, running: false });
    c.close();
  });
});
