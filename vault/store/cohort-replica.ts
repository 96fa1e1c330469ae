// A cohort node's local replica (vault/cohort/replica.ts) in SQLite: every
// value under the engine's etcd prefix with its mod_revision, plus the applied
// revision, the hash-chain head and the etcd cluster id. The replication
// engine (vault/cohort/ledger.ts) is its only writer; apply() and reset() are
// one SQLite transaction each, so a crash leaves the file at a revision
// boundary with the head that belongs to it.
//
// Its own file (not the record store's): in cohort mode the records live here,
// applied from etcd, and the single-node tables (records, buckets, undo) stay
// unused; a file of its own can be wiped and rebuilt from etcd without
// touching the tenants table. Reads are served from an in-memory map loaded at
// open: the engine calls get() on its hot path, synchronously.
import Database from 'better-sqlite3';
import { lstatSync } from 'node:fs';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { createIfMissing, lexists } from '../../lib/safe-file.js';
import { ZERO_HEAD, type Replica, type ReplicaEntry, type ReplicaOp } from '../cohort/replica.js';

const SCHEMA = `
  CREATE TABLE IF NOT EXISTS cohort_kv (
    key          TEXT PRIMARY KEY,
    mod_revision INTEGER NOT NULL CHECK (mod_revision >= 1),
    value        BLOB NOT NULL
  ) STRICT;
  CREATE TABLE IF NOT EXISTS cohort_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
  ) STRICT;`;

export class SqliteReplica implements Replica {
  appliedRevision = 0n;
  chainHead: Uint8Array = ZERO_HEAD;
  clusterId: string | undefined;
  private readonly db: Database.Database;
  private readonly map = new Map<string, ReplicaEntry>();
  private readonly stmts;

  constructor(readonly path: string) {
    if (path !== ':memory:') {
      for (const f of [path, `${path}-wal`, `${path}-shm`, `${path}-journal`]) {
        if (lexists(f) && !lstatSync(f).isFile()) {
          throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `${f} is not a regular file; refusing to open the cohort replica through it`);
        }
      }
      createIfMissing(path, 0o600);
    }
    try {
      this.db = new Database(path);
      this.db.pragma('journal_mode = WAL');
      // A replica can always be rebuilt from etcd, but one that claims a revision it
      // does not hold would be caught only by the anchor: keep commits durable.
      this.db.pragma('synchronous = FULL');
      this.db.pragma('secure_delete = ON');
      this.db.exec(SCHEMA);
    } catch (e) {
      throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot open cohort replica ${path}: ${(e as Error).message}`);
    }
    this.stmts = {
      put: this.db.prepare('INSERT INTO cohort_kv (key, mod_revision, value) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET mod_revision = excluded.mod_revision, value = excluded.value'),
      del: this.db.prepare('DELETE FROM cohort_kv WHERE key = ?'),
      clear: this.db.prepare('DELETE FROM cohort_kv'),
      meta: this.db.prepare('INSERT INTO cohort_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value'),
    };
    const meta = new Map(
      (this.db.prepare('SELECT key, value FROM cohort_meta').all() as { key: string; value: string }[]).map((r) => [r.key, r.value]),
    );
    this.appliedRevision = BigInt(meta.get('applied_revision') ?? '0');
    this.chainHead = meta.has('chain_head') ? new Uint8Array(Buffer.from(meta.get('chain_head')!, 'hex')) : ZERO_HEAD;
    this.clusterId = meta.get('cluster_id');
    const rows = this.db.prepare('SELECT key, mod_revision, value FROM cohort_kv').safeIntegers(true).all() as {
      key: string;
      mod_revision: bigint;
      value: Buffer;
    }[];
    for (const r of rows) this.map.set(r.key, { modRevision: r.mod_revision, value: new Uint8Array(r.value) });
  }

  get(key: string): ReplicaEntry | undefined {
    return this.map.get(key);
  }

  keys(prefix: string): string[] {
    return [...this.map.keys()].filter((k) => k.startsWith(prefix));
  }

  /** How many values the replica holds (status, tests). */
  get size(): number {
    return this.map.size;
  }

  apply(revision: bigint, ops: readonly ReplicaOp[], newHead: Uint8Array): void {
    if (revision <= this.appliedRevision) throw new Error(`replica: revision ${revision} is not after ${this.appliedRevision}`);
    this.db.transaction(() => {
      for (const op of ops) {
        if (op.type === 'put') this.stmts.put.run(op.key, revision, Buffer.from(op.value));
        else this.stmts.del.run(op.key);
      }
      this.stmts.meta.run('applied_revision', revision.toString());
      this.stmts.meta.run('chain_head', Buffer.from(newHead).toString('hex'));
    })();
    // The map follows only once the file holds the revision.
    for (const op of ops) {
      if (op.type === 'put') this.map.set(op.key, { modRevision: revision, value: op.value });
      else this.map.delete(op.key);
    }
    this.appliedRevision = revision;
    this.chainHead = newHead;
  }

  reset(revision: bigint, entries: ReadonlyMap<string, ReplicaEntry>, head: Uint8Array, clusterId: string): void {
    this.db.transaction(() => {
      this.stmts.clear.run();
      for (const [k, e] of entries) this.stmts.put.run(k, e.modRevision, Buffer.from(e.value));
      this.stmts.meta.run('applied_revision', revision.toString());
      this.stmts.meta.run('chain_head', Buffer.from(head).toString('hex'));
      this.stmts.meta.run('cluster_id', clusterId);
    })();
    this.map.clear();
    for (const [k, e] of entries) this.map.set(k, e);
    this.appliedRevision = revision;
    this.chainHead = head;
    this.clusterId = clusterId;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
