// The cache of checked bucket leaves (vault/core/bucket-cache.ts), pure parts:
// an entry is served only under its own hash, the cache stays bounded, and a new
// leaf lands exactly where SQLite's ORDER BY user_id puts its row.
import { describe, it, expect } from 'vitest';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { BucketCache, verifiedLeaves, withLeaf, type Leaves } from '../../vault/core/bucket-cache.js';
import { bucketHash } from '../../vault/core/state-hash.js';

const leaf = () => new Uint8Array(randomBytes(32));
const hashOf = (ls: Leaves) => bucketHash(ls.map((l) => l.leaf));

describe('BucketCache', () => {
  it('serves an entry only under the hash it was set with', () => {
    const c = new BucketCache();
    const ls: Leaves = [{ userId: 'a', leaf: leaf() }];
    const h = hashOf(ls);
    c.set(7, h, ls);
    expect(c.get(7, h)).toBe(ls);
    expect(c.get(7, hashOf([{ userId: 'a', leaf: leaf() }]))).toBeUndefined();
    expect(c.get(8, h)).toBeUndefined();
  });

  it('keeps at most its bound, dropping the entry set longest ago', () => {
    const c = new BucketCache(3);
    const h = hashOf([]);
    for (const b of [1, 2, 3]) c.set(b, h, []);
    c.set(1, h, []); // set again: now the newest
    c.set(4, h, []);
    expect(c.size).toBe(3);
    expect(c.get(2, h)).toBeUndefined();
    for (const b of [1, 3, 4]) expect(c.get(b, h)).toEqual([]);
  });
});

describe('verifiedLeaves', () => {
  it('accepts leaves that hash to the trusted hash and nothing else', () => {
    const ls = [
      { userId: 'a', leaf: leaf() },
      { userId: 'b', leaf: leaf() },
    ];
    expect(verifiedLeaves(ls, hashOf(ls))).toBe(ls);
    expect(verifiedLeaves([ls[1]!, ls[0]!], hashOf(ls))).toBeUndefined();
    expect(verifiedLeaves([ls[0]!], hashOf(ls))).toBeUndefined();
    expect(verifiedLeaves([ls[0]!, { userId: 'b', leaf: null }], hashOf(ls))).toBeUndefined();
  });
});

describe('withLeaf', () => {
  it('replaces a leaf in place', () => {
    const ls: Leaves = [
      { userId: 'a', leaf: leaf() },
      { userId: 'b', leaf: leaf() },
    ];
    const l = leaf();
    expect(withLeaf(ls, 'a', l)).toEqual([{ userId: 'a', leaf: l }, ls[1]]);
    expect(ls[0]!.leaf).not.toBe(l); // the cached array is not changed under its hash
  });

  it("inserts in SQLite's UTF-8 byte order, which is not JavaScript's", () => {
    // Code points whose UTF-16 and UTF-8 orders differ (surrogates D800–DFFF sort before
    // E000–FFFF in UTF-16, after them in UTF-8), beside ASCII and two-byte UTF-8.
    const alphabet = ['a', 'Z', '0', 'é', 'ß', '\uE000', '\uFF61', '\uFFFD', '\u{1F600}', '\u{10000}', '\u{20000}'];
    const db = new Database(':memory:');
    db.exec('CREATE TABLE r (user_id TEXT PRIMARY KEY) STRICT');
    const ins = db.prepare('INSERT INTO r VALUES (?)');
    let leaves: Leaves = [];
    const ids = new Set<string>();
    while (ids.size < 300) {
      const n = 1 + (randomBytes(1)[0]! % 4);
      ids.add(Array.from(randomBytes(n), (x) => alphabet[x % alphabet.length]).join(''));
    }
    for (const id of ids) {
      ins.run(id);
      leaves = withLeaf(leaves, id, leaf());
    }
    const sqlite = (db.prepare('SELECT user_id FROM r ORDER BY user_id').all() as { user_id: string }[]).map((r) => r.user_id);
    expect(leaves.map((l) => l.userId)).toEqual(sqlite);
    // The check has teeth: JavaScript's own order disagrees with SQLite's on these ids.
    expect([...ids].sort()).not.toEqual(sqlite);
    db.close();
  });
});
