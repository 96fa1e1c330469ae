// WAL checkpoints off the event loop (checkpoint-worker.ts runs them). The
// serving connection keeps SQLite's automatic checkpoint only as a backstop, at
// a threshold ten times higher: under steady writes the log is rarely fully
// copied between two commits, so SQLite cannot restart it from the beginning,
// and the backstop bounds its size. It then has only the last few batches to
// copy. Without the worker (it failed to start, or died) the serving
// connection goes back to SQLite's default.
import { Worker } from 'node:worker_threads';
import { workerUrl } from '../worker-url.js';
import type { CheckpointInit, FromCheckpointWorker, ToCheckpointWorker } from './checkpoint-worker.js';

/** SQLite's default auto-checkpoint threshold, in pages. */
export const DEFAULT_AUTOCHECKPOINT = 1000;
/** The backstop while the worker checkpoints: ~40 MiB of log at 4 KiB pages. */
export const BACKSTOP_AUTOCHECKPOINT = 10_000;

export interface CheckpointerOptions {
  /** At most one pass per this many ms while writes keep coming (default 200). */
  intervalMs?: number;
  /** The serving connection's auto-checkpoint threshold: set to the backstop, or back to the default. */
  setAutocheckpoint: (pages: number) => void;
  /** A pass failed (SQLite's code), or the worker stopped; checkpoints fall back to the serving connection. */
  onFailure?: (code: string) => void;
  workerUrl?: URL;
}

export interface CheckpointStats {
  passes: number;
  failures: number;
  /** Pages in the log and pages of it copied, after the last pass. */
  log: number;
  copied: number;
  running: boolean;
}

export class Checkpointer {
  private readonly worker: Worker;
  private readonly closed = new Int32Array(new SharedArrayBuffer(4));
  private readonly intervalMs: number;
  private alive = true;
  private running = false;
  private pending = false;
  private timer: NodeJS.Timeout | undefined;
  private lastEnd = 0;
  private readonly s = { passes: 0, failures: 0, log: 0, copied: 0 };

  constructor(
    path: string,
    private readonly o: CheckpointerOptions,
  ) {
    this.intervalMs = o.intervalMs ?? 200;
    const init: CheckpointInit = { path, closed: this.closed.buffer as SharedArrayBuffer };
    this.worker = new Worker(o.workerUrl ?? workerUrl(import.meta.url, 'checkpoint-worker.js'), { workerData: init, name: 'bkv-sqlite-checkpoint' });
    this.worker.unref();
    this.worker.on('message', (m: FromCheckpointWorker) => this.onMessage(m));
    this.worker.on('error', (e) => this.stop((e as { code?: string }).code ?? 'WORKER_ERROR'));
    this.worker.on('exit', () => this.stop('WORKER_EXIT'));
    o.setAutocheckpoint(BACKSTOP_AUTOCHECKPOINT);
  }

  /** A group commit reached the log: copy it back soon, at most one pass per interval. */
  poke(): void {
    if (!this.alive) return;
    if (this.running || this.timer) {
      this.pending = true;
      return;
    }
    const wait = this.lastEnd + this.intervalMs - Date.now();
    if (wait <= 0) return this.start();
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.start();
    }, wait);
    this.timer.unref();
  }

  stats(): CheckpointStats {
    return { ...this.s, running: this.running };
  }

  /**
   * Close the worker's connection before returning, so nothing touches the file after the
   * caller closes its own (and a test may then replace it). A pass in progress finishes first.
   */
  close(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    if (!this.alive) return;
    this.alive = false;
    this.worker.postMessage({ type: 'close' } satisfies ToCheckpointWorker);
    // Bounded: a checkpoint pass takes milliseconds; a stuck disk must not hang shutdown for ever.
    Atomics.wait(this.closed, 0, 0, 10_000);
    void this.worker.terminate();
  }

  private start(): void {
    this.running = true;
    this.pending = false;
    this.worker.postMessage({ type: 'checkpoint' } satisfies ToCheckpointWorker);
  }

  private onMessage(m: FromCheckpointWorker): void {
    if (m.type === 'ready') return;
    if (m.type === 'failed' && !this.running) return this.stop(m.code); // could not open
    this.running = false;
    this.lastEnd = Date.now();
    if (m.type === 'done') {
      this.s.passes++;
      this.s.log = m.log;
      this.s.copied = m.copied;
    } else {
      // Disk full or an I/O error: the serving connection's next write reports it where it matters.
      this.s.failures++;
      this.o.onFailure?.(m.code);
    }
    if (this.pending) this.poke();
  }

  private stop(code: string): void {
    if (!this.alive) return;
    this.alive = false;
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.o.setAutocheckpoint(DEFAULT_AUTOCHECKPOINT);
    this.o.onFailure?.(code);
  }
}
