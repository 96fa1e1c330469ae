// Starters racing for a data folder's lock after its owner was SIGKILLed: the race behind
// test/integration/single-owner.test.ts (a few rounds in the suite) and
// test/soak/single-owner-race.test.ts (many rounds). Each starter is its own process: it loads
// the lock module, says "ready", and on "try" takes the lock (the same acquireLock the daemon
// and bkv-admin use), answers "won" or "lost ...", and keeps what it won until killed.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ROOT } from './daemon.js';

const STARTER = (lockModule: string) => `const { acquireLock } = await import(${JSON.stringify(lockModule)});
const dir = process.argv[2];
const held = [];
process.stdin.setEncoding('utf8');
let buf = '';
process.stdin.on('data', (d) => {
  buf += d;
  let i;
  while ((i = buf.indexOf('\\n')) >= 0) {
    const cmd = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (cmd !== 'try') continue;
    try { held.push(acquireLock(dir, 'racer')); process.stdout.write('won\\n'); }
    catch (e) { process.stdout.write('lost ' + String(e.message).split('\\n')[0] + '\\n'); }
  }
});
process.stdout.write('ready\\n');
`;

interface Starter {
  p: ChildProcess;
  next(): Promise<string>;
}

/**
 * `rounds` times: SIGKILL the owner, let `n` starters try at once. Returns how many won in
 * each round (1 is right); throws if a loser's answer does not name the owner.
 */
export async function raceForLock(work: string, rounds: number, n = 6): Promise<number[]> {
  const script = join(work, 'starter.mjs');
  writeFileSync(script, STARTER(pathToFileURL(join(ROOT, 'dist/vault/admin/lock.js')).href));
  const dir = mkdtempSync(join(work, 'race-'));
  const all: Starter[] = [];
  const starter = (): Starter => {
    const p = spawn(process.execPath, [script, dir], { stdio: ['pipe', 'pipe', 'pipe'] });
    const queue: string[] = [];
    const waiting: ((l: string) => void)[] = [];
    let buf = '';
    p.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const l = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const w = waiting.shift();
        if (w) w(l);
        else queue.push(l);
      }
    });
    return { p, next: () => (queue.length ? Promise.resolve(queue.shift()!) : new Promise((r) => waiting.push(r))) };
  };
  const killHard = (s: Starter) =>
    new Promise<void>((r) => {
      if (s.p.exitCode !== null || s.p.signalCode !== null) return r();
      s.p.once('exit', () => r());
      s.p.kill('SIGKILL');
    });
  const expectLine = (got: string, want: RegExp, what: string) => {
    if (!want.test(got)) throw new Error(`${what}: "${got}" does not match ${want}`);
  };
  const spawnReady = async () => {
    const s = starter();
    all.push(s);
    expectLine(await s.next(), /^ready$/, 'starter');
    return s;
  };
  try {
    let owner = await spawnReady();
    owner.p.stdin!.write('try\n');
    expectLine(await owner.next(), /^won$/, 'first owner');
    let pool: Starter[] = [];
    const winners: number[] = [];
    for (let round = 0; round < rounds; round++) {
      // The crash: the owner dies without releasing anything.
      await killHard(owner);
      while (pool.length < n) pool.push(await spawnReady());
      for (const s of pool) s.p.stdin!.write('try\n');
      const answers = await Promise.all(pool.map((s) => s.next()));
      const won = pool.filter((_, i) => answers[i] === 'won');
      for (const a of answers) if (a !== 'won') expectLine(a, /^lost .*in use by /, `round ${round}`);
      winners.push(won.length);
      // More than one owner is the bug: kill them all and go on counting.
      for (const w of won.slice(1)) await killHard(w);
      pool = pool.filter((s) => !won.includes(s));
      owner = won[0] ?? (await spawnReady());
      if (!won[0]) {
        owner.p.stdin!.write('try\n');
        expectLine(await owner.next(), /^won$/, `round ${round}: a starter alone`);
      }
    }
    return winners;
  } finally {
    await Promise.all(all.map(killHard));
  }
}
