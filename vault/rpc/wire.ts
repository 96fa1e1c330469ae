// Shapes of the RPC params and channel bodies, checked before anything
// reaches the core. Binary fields are strict base64url with exact lengths.
import { z } from 'zod';
import { VaultError, ErrorCodes, type ErrorCode } from '../../protocol/errors.js';
import { fromB64 } from '../../protocol/bytes.js';

export const b64 = (len: number | { max: number }) =>
  z.string().transform((s, ctx) => {
    const bytes = fromB64(s);
    if (!bytes) {
      ctx.addIssue({ code: 'custom', message: 'not base64url' });
      return z.NEVER;
    }
    if (typeof len === 'number' ? bytes.length !== len : bytes.length > len.max) {
      ctx.addIssue({ code: 'custom', message: typeof len === 'number' ? `must be ${len} bytes` : `at most ${len.max} bytes` });
      return z.NEVER;
    }
    return bytes;
  });

const userId = z.string().min(1).max(512);
// The record namespace to act in (core/namespace.ts); absent: the tenant's home. Its spelling is
// checked when it is resolved against the tenant's grants (NAMESPACE_NOT_GRANTED, BAD_REQUEST).
const namespace = z.string().min(1).max(64).optional();

export const ChannelParams = z
  .object({
    userId,
    namespace,
    channel: z
      .object({
        id: b64(16),
        epk: b64(65).optional(),
        n: z.number().int().min(0).max(1000),
        ts: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
        ct: b64({ max: 8192 }),
      })
      .strict(),
  })
  .strict();

export const UserParams = z.object({ userId, namespace }).strict();
export const EmptyParams = z.object({}).strict();

const kdf = z.object({ alg: z.literal('argon2id'), m: z.number().int(), t: z.number().int(), p: z.number().int() }).strict();

export const Bodies = {
  'enroll.begin': z.object({ blinded: b64({ max: 256 }), grant: z.string().max(64).optional() }).strict(),
  'enroll.finish': z.object({ authKey: b64({ max: 256 }), envelope: b64({ max: 256 }), kdf }).strict(),
  // `guess`: the client's id for this password guess, the same on every node a fail-over sends it to; it
  // makes a retried begin idempotent in a cohort (a guess id already counted is not counted again).
  'recover.begin': z.object({ blinded: b64({ max: 256 }), guess: b64(16).optional() }).strict(),
  'recover.finish': z.object({ authKey: b64({ max: 256 }) }).strict(),
} as const;

/** Parse with a schema; failures become a VaultError naming the fields (never their values). */
export function parse<T extends z.ZodType>(schema: T, v: unknown, code: ErrorCode = ErrorCodes.BAD_REQUEST): z.output<T> {
  const r = schema.safeParse(v);
  if (r.success) return r.data;
  const where = r.error.issues
    .slice(0, 3)
    .map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`)
    .join('; ');
  throw new VaultError(code, `invalid params: ${where}`);
}
