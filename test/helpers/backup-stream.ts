// A large backup piped through seal -> open as a stream, measuring how much memory the
// pipe holds: test/unit/backup-format.test.ts (arrayBuffers, deterministic) and
// test/soak/backup-memory.test.ts (RSS, which moves with whatever else the machine runs).
import { createHash } from 'node:crypto';
import { sealBackup, openBackup } from '../../client/backup-format.js';

export interface StreamResult {
  consumed: number;
  inDigest: string;
  outDigest: string;
  /** Peak growth of process.memoryUsage().arrayBuffers while streaming. */
  peakAB: number;
  /** Peak growth of the process RSS while streaming. */
  peakRss: number;
}

export async function streamThrough(TOTAL: number, key: Uint8Array): Promise<StreamResult> {
    const inHash = createHash('sha256');
    const outHash = createHash('sha256');
    let produced = 0;
    let seed = 0x12345678;
    // Generator source with odd piece sizes so chunking and piece boundaries never align.
    async function* source() {
      while (produced < TOTAL) {
        const n = Math.min(TOTAL - produced, 1 + ((seed = (seed * 1103515245 + 12345) >>> 0) % (300 * 1024)));
        const piece = new Uint8Array(n);
        const w = new Uint32Array(piece.buffer, 0, n >>> 2);
        for (let i = 0; i < w.length; i += 64) w[i] = seed ^ i;
        piece[n - 1] = produced & 0xff;
        inHash.update(piece);
        produced += n;
        yield piece;
      }
    }
    const gen = source();
    const src = new ReadableStream<Uint8Array>({
      async pull(c) {
        const r = await gen.next();
        if (r.done) c.close();
        else c.enqueue(r.value);
      },
    });
    const before = process.memoryUsage();
    let peakAB = 0;
    let peakRss = 0;
    let consumed = 0;
    let pieces = 0;
    for await (const piece of openBackup(sealBackup(src, key), key) as unknown as AsyncIterable<Uint8Array>) {
      outHash.update(piece);
      consumed += piece.length;
      if (++pieces % 4 === 0) {
        const m = process.memoryUsage();
        peakAB = Math.max(peakAB, m.arrayBuffers - before.arrayBuffers);
        peakRss = Math.max(peakRss, m.rss - before.rss);
      }
    }
  return { consumed, inDigest: inHash.digest('hex'), outDigest: outHash.digest('hex'), peakAB, peakRss };
}
