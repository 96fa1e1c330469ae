/** Bench daemon settings: small Argon2id floor and no rate limits, so the vault itself is what is measured. */
export const BENCH_CONFIG = {
  vault: { kdfFloor: { m: 64, t: 1, p: 1 } },
  limits: { tenantPerSec: 1e9, tenantBurst: 1e9, userPerMin: 1e9, userBurst: 1e9, maxInFlight: 256 },
  log: { level: 'warn' },
};

/** Argon2id of the benchmark's enrolments (the floor above). */
export const BENCH_KDF = { alg: 'argon2id' as const, m: 64, t: 1, p: 1 };
