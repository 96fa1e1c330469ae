// The audit log writer: an append-only, hash-chained JSON-lines file of
// security events (format in chain.ts), with checkpoints signed by the HSM
// `sig` key every `checkpointEvery` events, every `checkpointSec` seconds
// while there is something new, and on shutdown.
//
// Appends are synchronous (one write(2) per line on an O_APPEND descriptor)
// so the line is in the kernel before the logging call returns; durability is
// fsync at every checkpoint and on close. A crash can therefore lose at most
// the lines since the last fsync, and may leave a half-written last line,
// which the next start cuts off and records as `audit.recovered`.
import { closeSync, fstatSync, fsync, fsyncSync, ftruncateSync, readSync, writeSync } from 'node:fs';
import { promisify } from 'node:util';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { toHex } from '../../protocol/bytes.js';
import { CHECKPOINT_EVENT, GENESIS, checkpointDigest, encodeLine, lineHash, type AuditFields } from './chain.js';
import { OPEN, openNoFollow } from '../../lib/safe-file.js';

export interface AuditSigner {
  vaultId: Uint8Array;
  sign(digest: Uint8Array): Promise<Uint8Array>;
}

export interface AuditOptions {
  checkpointEvery: number;
  checkpointSec: number;
  now?: () => number;
  /** Observers: a line was appended / a checkpoint written / something failed. */
  onAppend?: (event: string) => void;
  onCheckpoint?: () => void;
  onError?: (what: string, e: unknown) => void;
}

export interface AuditHead {
  seq: number;
  hash: string;
  /** Highest seq an HSM checkpoint in this process signed (0 before the first). */
  signedThrough: number;
  healthy: boolean;
}

export class AuditLog {
  private fd: number;
  private seq: number;
  private head: string;
  private sinceCheckpoint = 0;
  private signedThrough = 0;
  private signer: AuditSigner | undefined;
  private checkpointing: Promise<void> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private failed = false;
  private readonly now: () => number;

  private constructor(
    readonly file: string,
    private readonly o: AuditOptions,
    fd: number,
    seq: number,
    head: string,
    cutBytes: number,
  ) {
    this.fd = fd;
    this.seq = seq;
    this.head = head;
    this.now = o.now ?? Date.now;
    if (cutBytes > 0) this.append('audit.recovered', { droppedBytes: cutBytes });
    this.timer = setInterval(() => {
      if (this.sinceCheckpoint > 0) void this.checkpoint();
    }, o.checkpointSec * 1000);
    this.timer.unref();
  }

  /**
   * Open (or create, mode 0600) the file and continue its chain from the last complete line.
   * Never through a link at its name, and only a regular file (safe-file.ts): a planted link
   * would send every security event to a file of someone else's choosing.
   */
  static open(file: string, o: AuditOptions): AuditLog {
    let fd: number;
    try {
      fd = openNoFollow(file, OPEN.RDWR_CREATE, 0o600);
    } catch (e) {
      throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot open the audit log ${file}: ${(e as Error).message} (it must be a regular file, not a link)`);
    }
    try {
      const { seq, hash, validLength, size } = readTail(fd, file);
      // A half-written last line (crash mid-append) is cut off; the cut is recorded.
      if (validLength < size) ftruncateSync(fd, validLength);
      const afd = openNoFollow(file, OPEN.APPEND, 0o600);
      // The same file both times, not one swapped in between.
      const [a, b] = [fstatSync(fd), fstatSync(afd)];
      closeSync(fd);
      if (a.ino !== b.ino || a.dev !== b.dev) {
        closeSync(afd);
        throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `the audit log ${file} was replaced while it was being opened`);
      }
      return new AuditLog(file, o, afd, seq, hash, size - validLength);
    } catch (e) {
      try {
        closeSync(fd);
      } catch {
        /* already closed */
      }
      throw e;
    }
  }

  /** Lets checkpoints be signed; until then lines are chained but unsigned. */
  attachSigner(signer: AuditSigner | undefined): void {
    this.signer = signer;
    if (signer && this.sinceCheckpoint >= this.o.checkpointEvery) void this.checkpoint();
  }

  status(): AuditHead {
    return { seq: this.seq, hash: this.head, signedThrough: this.signedThrough, healthy: !this.failed };
  }

  /** Append one event. Never throws: a failing audit log shows in readiness and metrics. */
  append(event: string, fields: AuditFields, timeMs?: number): void {
    if (this.closed) return;
    const seq = this.seq + 1;
    const { line, hash } = encodeLine(seq, new Date(timeMs ?? this.now()).toISOString(), event, fields, this.head);
    try {
      const buf = Buffer.from(line + '\n');
      // O_APPEND: one write per line keeps lines whole even if another writer slipped in.
      const n = writeSync(this.fd, buf);
      if (n !== buf.length) throw new Error(`short write (${n} of ${buf.length} bytes)`);
    } catch (e) {
      this.failed = true;
      this.o.onError?.('append', e);
      return;
    }
    this.failed = false;
    this.seq = seq;
    this.head = hash;
    this.o.onAppend?.(event);
    if (event === CHECKPOINT_EVENT) return;
    this.sinceCheckpoint++;
    if (this.sinceCheckpoint >= this.o.checkpointEvery) void this.checkpoint();
  }

  /**
   * Sign the current head with the HSM and append the checkpoint. Concurrent
   * calls share one checkpoint. Resolves false when there was no signer, nothing
   * new, or the HSM refused (counted; the next trigger retries).
   */
  async checkpoint(): Promise<boolean> {
    const target = this.seq;
    if (this.checkpointing) {
      await this.checkpointing.catch(() => undefined);
      if (this.signedThrough >= target) return true;
    }
    if (this.checkpointing) return this.checkpoint();
    if (!this.signer || this.closed || this.sinceCheckpoint === 0) return false;
    const signer = this.signer;
    let ok = false;
    this.checkpointing = (async () => {
      const headSeq = this.seq;
      const headHash = this.head;
      const pending = this.sinceCheckpoint;
      try {
        const sig = await signer.sign(checkpointDigest(signer.vaultId, headSeq, headHash));
        if (this.closed) return;
        this.append(CHECKPOINT_EVENT, { vaultId: toHex(signer.vaultId), headSeq, headHash, sig: toHex(sig) });
        // Lines that arrived while the HSM signed still count toward the next checkpoint.
        this.sinceCheckpoint = Math.max(0, this.sinceCheckpoint - pending);
        this.signedThrough = headSeq;
        // On libuv's pool, not the event loop: a synchronous fsync here stalled every request
        // in flight for as long as the disk took (docs/PERFORMANCE.md, latency).
        await fsyncAsync(this.fd);
        this.o.onCheckpoint?.();
        ok = true;
      } catch (e) {
        this.o.onError?.('checkpoint', e);
      }
    })();
    try {
      await this.checkpointing;
    } finally {
      this.checkpointing = undefined;
    }
    return ok;
  }

  /** Final checkpoint (while the HSM is still open), fsync, close. */
  async close(opts: { checkpoint?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    if (this.timer) clearInterval(this.timer);
    if (opts.checkpoint ?? true) await this.checkpoint();
    else if (this.checkpointing) await this.checkpointing.catch(() => undefined);
    this.closed = true;
    try {
      fsyncSync(this.fd);
    } catch {
      /* nothing more to do on the way out */
    }
    closeSync(this.fd);
  }
}

/** The last complete line's seq and hash, and where the complete lines end. */
function readTail(fd: number, file: string): { seq: number; hash: string; validLength: number; size: number } {
  const size = fstatSync(fd).size;
  if (size === 0) return { seq: 0, hash: GENESIS, validLength: 0, size };
  // Read backwards in chunks until we hold the last newline and the line before it.
  let chunk = 64 * 1024;
  for (;;) {
    const start = Math.max(0, size - chunk);
    const buf = Buffer.alloc(size - start);
    readSync(fd, buf, 0, buf.length, start);
    const text = buf.toString('utf8');
    const lastNl = text.lastIndexOf('\n');
    if (lastNl < 0 && start > 0) {
      chunk *= 4;
      continue;
    }
    const validLength = lastNl < 0 ? 0 : start + Buffer.byteLength(text.slice(0, lastNl + 1));
    if (validLength === 0) return { seq: 0, hash: GENESIS, validLength: 0, size };
    const before = text.lastIndexOf('\n', lastNl - 1);
    if (before < 0 && start > 0) {
      chunk *= 4;
      continue;
    }
    const lastLine = text.slice(before + 1, lastNl);
    let obj: { seq?: unknown; hash?: unknown };
    try {
      obj = JSON.parse(lastLine) as typeof obj;
    } catch {
      obj = {};
    }
    const suffix = `,"hash":"${String(obj.hash)}"}`;
    // Never extend a chain whose head does not check out: that head is evidence, not a base.
    if (typeof obj.seq !== 'number' || typeof obj.hash !== 'string' || !lastLine.endsWith(suffix) ||
      lineHash(lastLine.slice(0, -suffix.length) + '}') !== obj.hash) {
      throw new VaultError(
        ErrorCodes.INTERNAL,
        `audit log ${file}: its last complete line does not check out (modified or corrupt). Keep the file as evidence, ` +
          `move it aside (the vault then starts a new chain) and run "bkv-admin audit verify --file" on it.`,
      );
    }
    return { seq: obj.seq, hash: obj.hash, validLength, size };
  }
}

const fsyncAsync = promisify(fsync);
