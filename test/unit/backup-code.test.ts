import { describe, it, expect } from 'vitest';
import { formatKeyCode, parseKeyCode, generateBackupKey } from '../../client/backup-code.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

const KEY = Uint8Array.from({ length: 32 }, (_, i) => (i * 37 + 0xa5) & 0xff);

function catchErr(fn: () => unknown): VaultError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(VaultError);
    return e as VaultError;
  }
  throw new Error('expected a VaultError');
}

describe('backup key code', () => {
  it('generates 32 random bytes', () => {
    const a = generateBackupKey();
    const b = generateBackupKey();
    expect(a).toBeInstanceOf(Uint8Array);
    expect(a.length).toBe(32);
    expect(Buffer.from(a).equals(Buffer.from(b))).toBe(false);
  });

  it('formats as 16 space-separated groups of 4 uppercase hex digits', () => {
    const code = formatKeyCode(KEY);
    expect(code).toMatch(/^[0-9A-F]{4}( [0-9A-F]{4}){15}$/);
    expect(code.replace(/ /g, '')).toBe(Buffer.from(KEY).toString('hex').toUpperCase());
    expect(formatKeyCode(new Uint8Array(32))).toBe(Array(16).fill('0000').join(' '));
  });

  it('round trips through the canonical form and sloppy variants', () => {
    const code = formatKeyCode(KEY);
    const hex = code.replace(/ /g, '');
    const variants = [
      code,
      code.toLowerCase(),
      hex,
      hex.toLowerCase(),
      code.replace(/ /g, '-'),
      code.replace(/ /g, ' - '),
      `  ${code.slice(0, 39)}\n${code.slice(40)}\t\r\n`,
      hex.match(/.{8}/g)!.join('\t'),
      hex.split('').map((c, i) => (i % 2 ? c.toLowerCase() : c)).join(''),
      // docs/BACKUP-FORMAT.md: any \s counts as a separator, a no-break space too; dashes may repeat.
      code.replace(/ /g, '\u00a0'),
      code.replace(/ /g, '--'),
    ];
    for (const v of variants) expect(Buffer.from(parseKeyCode(v))).toEqual(Buffer.from(KEY));
    for (let i = 0; i < 20; i++) {
      const k = generateBackupKey();
      expect(Buffer.from(parseKeyCode(formatKeyCode(k)))).toEqual(Buffer.from(k));
    }
  });

  it('rejects 63 and 65 digits, saying how many were found', () => {
    const hex = formatKeyCode(KEY).replace(/ /g, '');
    for (const [text, n] of [
      [hex.slice(1), 63],
      [hex + 'A', 65],
      ['', 0],
      [hex.slice(0, 32), 32],
    ] as const) {
      const e = catchErr(() => parseKeyCode(text));
      expect(e.code).toBe(ErrorCodes.BAD_REQUEST);
      expect(e.message).toContain(`found ${n}`);
      expect(e.message).toContain('64');
    }
  });

  it('rejects non-hex characters without echoing the code', () => {
    const code = formatKeyCode(KEY);
    const bad = [
      code.replace(/^./, 'O'), // letter O for zero
      code.slice(0, -1) + 'G',
      code.replace(/ /g, '_'),
      code.replace(/ /g, '.'),
      code + ' Z',
      // docs/BACKUP-FORMAT.md: other separators and a 0x prefix are refused.
      code.replace(/ /g, ':'),
      code.replace(/ /g, '\u2013'), // en dash
      `0x${code.replace(/ /g, '')}`,
    ];
    for (const text of bad) {
      const e = catchErr(() => parseKeyCode(text));
      expect(e.code).toBe(ErrorCodes.BAD_REQUEST);
      // No run of 4+ code digits may leak into the message.
      for (const group of code.split(' ')) expect(e.message).not.toContain(group);
      expect(e.message).not.toMatch(/[0-9A-Fa-f]{4}/);
    }
  });

  it('never echoes digits when the length is wrong', () => {
    const hex = formatKeyCode(KEY).replace(/ /g, '');
    const e = catchErr(() => parseKeyCode(hex.slice(2)));
    expect(e.message).not.toMatch(/[0-9A-Fa-f]{4}/);
    expect(JSON.stringify(e.detail)).not.toMatch(/[0-9A-Fa-f]{4}/);
  });

  it('refuses to format a key of the wrong length', () => {
    expect(catchErr(() => formatKeyCode(new Uint8Array(31))).code).toBe(ErrorCodes.BAD_REQUEST);
    expect(catchErr(() => formatKeyCode(new Uint8Array(33))).code).toBe(ErrorCodes.BAD_REQUEST);
  });
});
