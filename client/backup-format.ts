// "BKV1": streaming encrypted backup files, chunked AES-256-GCM. The byte layout is
// specified in docs/BACKUP-FORMAT.md; keep the two in sync.
//
// Design choices, and why:
// - Chunked so that seal/open run in memory bounded by ~2 chunks, whatever the file size.
// - A fresh random salt per file gives a fresh content key per file, so the counter
//   nonces below never repeat under one key even though K is reused for every backup.
// - nonce = u64 chunk index || final flag || 3 zero bytes: the index pins each chunk to
//   its position (no reorder/drop/duplicate), the final flag makes truncation at a chunk
//   boundary and data appended after the end fail authentication (STREAM construction).
// - The whole header is the AAD of every chunk, so any header edit breaks every chunk
//   without needing a separate header MAC.
// - A key check value in the header lets restore report "wrong backup key" (a mistyped
//   code) before touching any ciphertext, distinctly from corruption.
//
// Pure WebCrypto + Web Streams, no `node:` imports: this runs in browsers too.

import { hkdf } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { VaultError, ErrorCodes } from '../protocol/errors.js';

export const BACKUP_MAGIC = 'BKV1';
export const BACKUP_VERSION = 1;
export const HEADER_LENGTH = 58; // 4 magic + 1 version + 1 flags + 4 chunk size + 32 salt + 16 key check
export const DEFAULT_CHUNK_SIZE = 1024 * 1024;
export const MIN_CHUNK_SIZE = 4 * 1024;
export const MAX_CHUNK_SIZE = 16 * 1024 * 1024;
export const TAG_LENGTH = 16;
const SALT_LENGTH = 32;
const KEY_CHECK_LENGTH = 16;
const KEY_LENGTH = 32;

const INFO_KEYCHECK = new TextEncoder().encode('bkv-v1-backup-keycheck');
const INFO_CONTENT = new TextEncoder().encode('bkv-v1-backup-content');
const MAGIC_BYTES = new TextEncoder().encode(BACKUP_MAGIC);

export interface BackupHeader {
  version: number;
  flags: number;
  chunkSize: number;
  salt: Uint8Array;
  keyCheck: Uint8Array;
  /** The exact header bytes, which are the AAD of every chunk. */
  bytes: Uint8Array;
}

export interface SealOptions {
  /** Plaintext bytes per chunk, MIN_CHUNK_SIZE..MAX_CHUNK_SIZE. Default 1 MiB. */
  chunkSize?: number;
  /**
   * FOR TEST VECTORS ONLY. Fixes the 32-byte file salt. Reusing a salt with the same
   * key reuses the content key and nonces, which destroys AES-GCM security.
   */
  salt?: Uint8Array;
}

const corrupted = (detail?: Record<string, number>) =>
  new VaultError(ErrorCodes.DECRYPT_FAILED, 'backup is corrupted or truncated', detail);
const notABackup = (why: string) => new VaultError(ErrorCodes.BAD_REQUEST, `not a BKV1 backup: ${why}`);

function checkKey(key: Uint8Array): void {
  if (!(key instanceof Uint8Array) || key.length !== KEY_LENGTH) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `backup key must be ${KEY_LENGTH} bytes`);
  }
}

function checkChunkSize(n: number): void {
  if (!Number.isInteger(n) || n < MIN_CHUNK_SIZE || n > MAX_CHUNK_SIZE) {
    throw new VaultError(
      ErrorCodes.BAD_REQUEST,
      `backup chunk size must be an integer from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE} bytes`,
    );
  }
}

function deriveKeyCheck(key: Uint8Array, salt: Uint8Array): Uint8Array {
  return hkdf(sha256, key, salt, INFO_KEYCHECK, KEY_CHECK_LENGTH);
}

async function deriveContentKey(key: Uint8Array, salt: Uint8Array): Promise<CryptoKey> {
  const raw = new Uint8Array(hkdf(sha256, key, salt, INFO_CONTENT, KEY_LENGTH));
  try {
    // Non-extractable: the content key lives only inside WebCrypto from here on.
    return await globalThis.crypto.subtle.importKey('raw', raw, 'AES-GCM', false, ['encrypt', 'decrypt']);
  } finally {
    raw.fill(0);
  }
}

function nonceFor(index: number, final: boolean): Uint8Array<ArrayBuffer> {
  const nonce = new Uint8Array(12);
  const view = new DataView(nonce.buffer);
  view.setUint32(0, Math.floor(index / 2 ** 32));
  view.setUint32(4, index >>> 0);
  nonce[8] = final ? 1 : 0;
  return nonce;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

function checkMagicPrefix(prefix: Uint8Array): void {
  if (!equalBytes(prefix, MAGIC_BYTES.subarray(0, prefix.length))) throw notABackup('bad magic');
}

/** Parses and validates the first HEADER_LENGTH bytes of `bytes` (extra bytes are ignored). Does not check the key. */
export function readBackupHeader(bytes: Uint8Array): BackupHeader {
  checkMagicPrefix(bytes.subarray(0, MAGIC_BYTES.length));
  if (bytes.length < HEADER_LENGTH) throw notABackup(`header needs ${HEADER_LENGTH} bytes, got ${bytes.length}`);
  const h = new Uint8Array(bytes.subarray(0, HEADER_LENGTH));
  const view = new DataView(h.buffer);
  const version = h[4]!;
  const flags = h[5]!;
  if (version !== BACKUP_VERSION) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `unsupported backup format version ${version}`);
  }
  // No flags are defined; refusing unknown ones keeps future meanings unambiguous.
  if (flags !== 0) throw new VaultError(ErrorCodes.BAD_REQUEST, 'unsupported backup flags');
  const chunkSize = view.getUint32(6);
  checkChunkSize(chunkSize);
  return { version, flags, chunkSize, salt: h.slice(10, 42), keyCheck: h.slice(42, 58), bytes: h };
}

function encodeHeader(chunkSize: number, salt: Uint8Array, keyCheck: Uint8Array): Uint8Array<ArrayBuffer> {
  const h = new Uint8Array(HEADER_LENGTH);
  h.set(MAGIC_BYTES, 0);
  h[4] = BACKUP_VERSION;
  h[5] = 0;
  new DataView(h.buffer).setUint32(6, chunkSize);
  h.set(salt, 10);
  h.set(keyCheck, 42);
  return h;
}

const EMPTY = new Uint8Array(0);

/** FIFO of input pieces of arbitrary sizes, so chunk boundaries do not depend on how the input was split. */
class ByteQueue {
  private pieces: Uint8Array[] = [];
  private first = 0; // index of the first live piece (avoids O(n) shift() with many tiny pieces)
  private head = 0; // offset into pieces[first]
  length = 0;

  push(p: Uint8Array): void {
    if (p.length === 0) return;
    this.pieces.push(p);
    this.length += p.length;
  }

  /** Copies out the next n bytes, n <= length. Copying means later reuse of the caller's buffers cannot reach us. */
  take(n: number): Uint8Array<ArrayBuffer> {
    const out = this.peek(n);
    let left = n;
    while (left > 0) {
      const p = this.pieces[this.first]!;
      const k = Math.min(left, p.length - this.head);
      left -= k;
      this.head += k;
      if (this.head === p.length) {
        this.pieces[this.first++] = EMPTY; // drop the reference now, or consumed pieces pile up in memory
        this.head = 0;
      }
    }
    if (this.first === this.pieces.length || this.first > 1024) {
      this.pieces = this.pieces.slice(this.first);
      this.first = 0;
    }
    this.length -= n;
    return out;
  }

  peek(n: number): Uint8Array<ArrayBuffer> {
    const out = new Uint8Array(Math.min(n, this.length));
    let filled = 0;
    let head = this.head;
    for (let i = this.first; filled < out.length; i++) {
      const p = this.pieces[i]!;
      const k = Math.min(out.length - filled, p.length - head);
      out.set(p.subarray(head, head + k), filled);
      filled += k;
      head = 0;
    }
    return out;
  }
}

function asBytes(chunk: unknown): Uint8Array {
  if (!(chunk instanceof Uint8Array)) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'backup streams carry Uint8Array chunks only');
  }
  return chunk;
}

/** Encrypts a plaintext stream into a BKV1 stream. */
export function sealBackup(
  plaintext: ReadableStream<Uint8Array>,
  key: Uint8Array,
  opts: SealOptions = {},
): ReadableStream<Uint8Array> {
  checkKey(key);
  const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
  checkChunkSize(chunkSize);
  if (opts.salt !== undefined && (!(opts.salt instanceof Uint8Array) || opts.salt.length !== SALT_LENGTH)) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `backup salt must be ${SALT_LENGTH} bytes`);
  }
  const salt = opts.salt ? new Uint8Array(opts.salt) : globalThis.crypto.getRandomValues(new Uint8Array(SALT_LENGTH));
  const header = encodeHeader(chunkSize, salt, deriveKeyCheck(key, salt));
  const contentKey = deriveContentKey(key, salt);
  contentKey.catch(() => {}); // surfaced through the stream below, not as an unhandled rejection
  const queue = new ByteQueue();
  let index = 0;

  const sealChunk = async (final: boolean): Promise<Uint8Array> => {
    const pt = queue.take(final ? queue.length : chunkSize);
    const ct = await globalThis.crypto.subtle.encrypt(
      { name: 'AES-GCM', iv: nonceFor(index++, final), additionalData: header, tagLength: TAG_LENGTH * 8 },
      await contentKey,
      pt,
    );
    return new Uint8Array(ct);
  };

  return plaintext.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      start(controller) {
        controller.enqueue(header.slice());
      },
      async transform(piece, controller) {
        queue.push(asBytes(piece));
        // Strictly more than a chunk: a full chunk is only non-final once we know more
        // data follows, because its final flag is sealed into its nonce.
        while (queue.length > chunkSize) controller.enqueue(await sealChunk(false));
      },
      async flush(controller) {
        // Always one final chunk, possibly empty or full-size.
        controller.enqueue(await sealChunk(true));
      },
    }),
  );
}

/**
 * Decrypts and authenticates a BKV1 stream. Plaintext is released chunk by chunk, so a
 * consumer must not act on the output as a complete backup until the stream closes
 * without error: truncation is only detectable at the end.
 */
export function openBackup(ciphertext: ReadableStream<Uint8Array>, key: Uint8Array): ReadableStream<Uint8Array> {
  checkKey(key);
  const queue = new ByteQueue();
  let header: BackupHeader | undefined;
  let contentKey: CryptoKey | undefined;
  let index = 0;

  const openChunk = async (final: boolean, sealedLength: number): Promise<Uint8Array> => {
    const ct = queue.take(sealedLength);
    const chunk = index++;
    try {
      const pt = await globalThis.crypto.subtle.decrypt(
        { name: 'AES-GCM', iv: nonceFor(chunk, final), additionalData: header!.bytes as Uint8Array<ArrayBuffer>, tagLength: TAG_LENGTH * 8 },
        contentKey!,
        ct,
      );
      return new Uint8Array(pt);
    } catch {
      throw corrupted({ chunk });
    }
  };

  return ciphertext.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      async transform(piece, controller) {
        queue.push(asBytes(piece));
        if (!header) {
          // Reject non-backups as soon as the magic is visible rather than after 58 bytes.
          if (queue.length < HEADER_LENGTH) {
            checkMagicPrefix(queue.peek(MAGIC_BYTES.length));
            return;
          }
          const h = readBackupHeader(queue.take(HEADER_LENGTH));
          if (!equalBytes(deriveKeyCheck(key, h.salt), h.keyCheck)) {
            throw new VaultError(ErrorCodes.DECRYPT_FAILED, 'wrong backup key');
          }
          contentKey = await deriveContentKey(key, h.salt);
          header = h;
        }
        const sealed = header.chunkSize + TAG_LENGTH;
        // Strictly more than one sealed chunk buffered: only then is the first one
        // known to be non-final (mirror of sealBackup).
        while (queue.length > sealed) controller.enqueue(await openChunk(false, sealed));
      },
      async flush(controller) {
        if (!header) {
          if (queue.length === 0) throw notABackup('empty input');
          checkMagicPrefix(queue.peek(MAGIC_BYTES.length));
          throw corrupted(); // right magic, but the header itself is cut short
        }
        // The remainder must be the final chunk. A file cut at a chunk boundary leaves
        // a non-final chunk here, and bytes appended after the real final chunk turn it
        // into a non-final one: either way the final-flag nonce makes GCM reject it.
        if (queue.length < TAG_LENGTH) throw corrupted({ chunk: index });
        controller.enqueue(await openChunk(true, queue.length));
      },
    }),
  );
}

function bytesStream(bytes: Uint8Array): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(bytes);
      controller.close();
    },
  });
}

async function collect(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  let total = 0;
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    total += value.length;
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

export function sealBytes(plaintext: Uint8Array, key: Uint8Array, opts?: SealOptions): Promise<Uint8Array> {
  return collect(sealBackup(bytesStream(plaintext), key, opts));
}

export function openBytes(ciphertext: Uint8Array, key: Uint8Array): Promise<Uint8Array> {
  return collect(openBackup(bytesStream(ciphertext), key));
}
