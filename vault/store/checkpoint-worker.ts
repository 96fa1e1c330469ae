// A second SQLite connection on a thread of its own. Its one job is the WAL
// checkpoint: copying the write-ahead log back into the database file and
// syncing it. On the serving connection that copy ran inside a COMMIT, on the
// event loop, and stalled every request for 10–35 ms each time the log passed
// 1 000 pages (docs/PERFORMANCE.md). Started by checkpointer.ts, never imported
// elsewhere.
import { parentPort, workerData } from 'node:worker_threads';
import Database from 'better-sqlite3';

export interface CheckpointInit {
  path: string;
  /** Set to 1 once this connection is closed: close() on the main thread waits for it. */
  closed: SharedArrayBuffer;
}

export type ToCheckpointWorker = { type: 'checkpoint' } | { type: 'close' };

export type FromCheckpointWorker =
  | { type: 'ready' }
  /** log: pages in the WAL; copied: pages of it now in the database file (SQLite's own counts). */
  | { type: 'done'; busy: boolean; log: number; copied: number }
  | { type: 'failed'; code: string };

const init = workerData as CheckpointInit;
const port = parentPort!;
const closed = new Int32Array(init.closed);
let db: Database.Database | undefined;

const code = (e: unknown) => (e as { code?: string }).code ?? 'SQLITE_ERROR';
const send = (m: FromCheckpointWorker) => port.postMessage(m);

function close(): void {
  try {
    db?.close();
  } catch {
    /* closing is best effort; the serving connection owns the file */
  }
  db = undefined;
  Atomics.store(closed, 0, 1);
  Atomics.notify(closed, 0);
  port.close();
}

try {
  db = new Database(init.path, { fileMustExist: true });
  // Checkpoints sync the log before copying and the database file after, as on the serving connection.
  db.pragma('synchronous = NORMAL');
  send({ type: 'ready' });
} catch (e) {
  send({ type: 'failed', code: code(e) });
  close();
}

port.on('message', (m: ToCheckpointWorker) => {
  if (m.type === 'close' || !db) return close();
  try {
    // PASSIVE: copy what no reader still needs, never wait for or block the writer.
    const [r] = db.pragma('wal_checkpoint(PASSIVE)') as { busy: number; log: number; checkpointed: number }[];
    send({ type: 'done', busy: r!.busy !== 0, log: r!.log, copied: r!.checkpointed });
  } catch (e) {
    send({ type: 'failed', code: code(e) });
  }
});
