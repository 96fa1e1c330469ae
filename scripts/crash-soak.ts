// Long crash-consistency run (the suite runs 6 cycles of the same driver):
//   npx tsx scripts/crash-soak.ts [--seed N] [--cycles N] [--users N]
// Prints one line per SIGKILL cycle and a JSON summary; exits 1 on any violation.
import { crashCycles } from '../test/helpers/crash.js';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const seed = arg('seed', 7);
const cycles = arg('cycles', 40);
const users = arg('users', 24);
const t0 = Date.now();
const reports = await crashCycles({
  seed,
  cycles,
  users,
  log: (r) =>
    console.log(`cycle ${String(r.cycle).padStart(3)}  killed after ${String(r.killedAfterMs).padStart(4)} ms  acknowledged ${String(r.acknowledged).padStart(4)}  violations ${r.violations.length}`),
});
const summary = {
  seed,
  cycles,
  users,
  acknowledged: reports.reduce((n, r) => n + r.acknowledged, 0),
  violations: reports.flatMap((r) => r.violations),
  seconds: Math.round((Date.now() - t0) / 1000),
};
console.log(JSON.stringify(summary));
process.exit(summary.violations.length ? 1 : 0);
