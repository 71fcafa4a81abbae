// Cubicle JavaScript kernel: runs code for one code-interpreter context (Node 18+).
//
// Launched by cubicle-agent as `node -e <this source>` (self-contained, below the 128 KiB
// limit of one argv string). Protocol (docs/interpreter.md): fd 0 requests (JSON lines),
// fds 1/2 raw output, fd 3 events (JSON lines).
//
// User code runs in this process's main context (vm.runInThisContext), so every Node
// global (require, process, Buffer, fetch, timers...) is there as in a script. The kernel
// itself lives in this closure and leaves nothing on globalThis but `__cubicleImport`.
//
// Persistence: top-level `let`/`const` become `var` and `class X {}` becomes
// `var X = class X {};` so names survive into later executions and may be declared again
// (as in a notebook). Cells using top-level `await` (or static `import`) run inside an
// async function: their top-level declarations are hoisted to global `var`s and assigned
// in place, and the last expression statement is returned as the cell's value.
'use strict';
(() => {
  const fs = require('fs');
  const vm = require('vm');
  const util = require('util');
  const { Console } = require('console');

  const STDOUT_FD = 1;
  const STDERR_FD = 2;
  const LANGUAGE = 'javascript';

  // Keep fds 0 (requests) and 3 (events) away from user subprocesses: reopen them through
  // /proc as close-on-exec descriptors (Node opens files with O_CLOEXEC), put /dev/null on
  // fd 0 and close fd 3. A background process started by user code therefore never holds
  // the event pipe open (the agent sees EOF when the kernel dies) nor eats requests.
  function reopen(fd, flags) {
    try {
      const copy = fs.openSync(`/proc/self/fd/${fd}`, flags);
      return copy;
    } catch (e) {
      return fd; // not a pipe (e.g. a socket): keep the original descriptor
    }
  }
  const eventFd = reopen(3, 'w');
  if (eventFd !== 3) fs.closeSync(3);
  let requestFd = reopen(0, 'r');
  if (requestFd !== 0) {
    fs.closeSync(0);
    const devnull = fs.openSync('/dev/null', 'r'); // lowest free descriptor: 0
    if (devnull !== 0) fs.closeSync(devnull);
  }

  // --- events ---------------------------------------------------------------------------

  const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
  const wellFormed = (s) => (typeof s === 'string' && /[\ud800-\udfff]/.test(s) ? s.replace(LONE_SURROGATE, '\ufffd') : s);
  const sleeper = new Int32Array(new SharedArrayBuffer(4));

  function writeAll(fd, buf) {
    let off = 0;
    while (off < buf.length) {
      try {
        off += fs.writeSync(fd, buf, off, buf.length - off);
      } catch (e) {
        if (e.code === 'EAGAIN') {
          Atomics.wait(sleeper, 0, 0, 1);
          continue;
        }
        throw e;
      }
    }
  }

  function emit(obj) {
    const line = JSON.stringify(obj, (k, v) => wellFormed(v)) + '\n';
    writeAll(eventFd, Buffer.from(line, 'utf8'));
  }

  // The hot path (console.log): the line is built by hand.
  function emitStream(id, name, text) {
    const line = `{"id":${JSON.stringify(id)},"type":"${name}","text":${JSON.stringify(wellFormed(text))},"timestamp":"${timestamp()}"}\n`;
    writeAll(eventFd, Buffer.from(line, 'utf8'));
  }

  function timestamp() {
    // RFC 3339 UTC with microseconds (the clock has milliseconds).
    return new Date().toISOString().replace(/Z$/, '000Z');
  }

  // --- output capture -------------------------------------------------------------------

  let current = null; // the running execution: {id, errored}
  const CHUNK = 64 * 1024;

  function streamText(name, text) {
    if (!text) return;
    if (current === null) {
      writeAll(name === 'stdout' ? STDOUT_FD : STDERR_FD, Buffer.from(text, 'utf8'));
      return;
    }
    if (text.length <= CHUNK) {
      emitStream(current.id, name, text);
      return;
    }
    for (let i = 0; i < text.length; i += CHUNK) emitStream(current.id, name, text.slice(i, i + CHUNK));
  }

  function asText(chunk, encoding) {
    if (typeof chunk === 'string') return chunk;
    if (chunk instanceof Uint8Array) return Buffer.from(chunk).toString(typeof encoding === 'string' ? encoding : 'utf8');
    return String(chunk);
  }

  const EventEmitter = require('events');
  const fakeStream = (name) => Object.assign(new EventEmitter(), {
    writable: true,
    isTTY: false,
    write(chunk, encoding, cb) {
      streamText(name, asText(chunk, encoding));
      if (typeof encoding === 'function') encoding();
      else if (typeof cb === 'function') cb();
      return true;
    },
  });
  const userConsole = new Console({ stdout: fakeStream('stdout'), stderr: fakeStream('stderr'), colorMode: false });
  globalThis.console = userConsole;

  // process.stdout/stderr.write during an execution become events too (Node writes pipes
  // asynchronously, which could reorder them after end_of_execution).
  for (const [name, stream] of [['stdout', process.stdout], ['stderr', process.stderr]]) {
    const original = stream.write.bind(stream);
    stream.write = function write(chunk, encoding, cb) {
      if (current === null) return original(chunk, encoding, cb);
      streamText(name, asText(chunk, encoding));
      if (typeof encoding === 'function') encoding();
      else if (typeof cb === 'function') cb();
      return true;
    };
  }

  // Errors thrown later by callbacks (timers, promises) must not kill the kernel.
  process.on('uncaughtException', (err) => {
    streamText('stderr', `Uncaught ${describe(err).traceback}\n`);
  });
  process.on('unhandledRejection', (reason) => {
    streamText('stderr', `Unhandled promise rejection: ${describe(reason).traceback}\n`);
  });

  // Dynamic import() from user code (vm scripts cannot import without a flag).
  Object.defineProperty(globalThis, '__cubicleImport', {
    value: (specifier) => import(specifier),
    enumerable: false,
  });

  // --- tokenizer ------------------------------------------------------------------------

  const PUNCTUATORS = [
    '>>>=', '...', '===', '!==', '**=', '<<=', '>>=', '>>>', '&&=', '||=', '??=',
    '=>', '==', '!=', '<=', '>=', '&&', '||', '??', '?.', '++', '--', '+=', '-=', '*=', '/=',
    '%=', '&=', '|=', '^=', '<<', '>>', '**',
  ];
  const BEFORE_EXPRESSION = new Set([
    'return', 'typeof', 'instanceof', 'in', 'of', 'new', 'delete', 'void', 'throw', 'case',
    'do', 'else', 'yield', 'await', 'extends',
  ]);
  const ID_START = /[A-Za-z_$\u0080-\uffff\\]/;
  const ID_PART = /[A-Za-z0-9_$\u0080-\uffff\\\u200c\u200d]/;

  function isNewline(c) {
    return c === '\n' || c === '\r' || c === '\u2028' || c === '\u2029';
  }

  function skipString(src, i) {
    const quote = src[i++];
    while (i < src.length && src[i] !== quote) {
      if (src[i] === '\\') i++;
      else if (isNewline(src[i])) break;
      i++;
    }
    return i + 1;
  }

  function skipTemplate(src, i) {
    i++; // opening backquote
    while (i < src.length) {
      const c = src[i];
      if (c === '\\') { i += 2; continue; }
      if (c === '`') return i + 1;
      if (c === '$' && src[i + 1] === '{') { i = skipBalanced(src, i + 2); continue; }
      i++;
    }
    return i;
  }

  // From just inside a `${`, past its closing `}`.
  function skipBalanced(src, i) {
    let depth = 1;
    while (i < src.length) {
      const c = src[i];
      if (c === '"' || c === "'") { i = skipString(src, i); continue; }
      if (c === '`') { i = skipTemplate(src, i); continue; }
      if (c === '/' && src[i + 1] === '/') { while (i < src.length && !isNewline(src[i])) i++; continue; }
      if (c === '/' && src[i + 1] === '*') { const e = src.indexOf('*/', i + 2); i = e < 0 ? src.length : e + 2; continue; }
      if (c === '{') depth++;
      else if (c === '}' && --depth === 0) return i + 1;
      i++;
    }
    return i;
  }

  function regexAllowed(prev) {
    if (!prev) return true;
    if (prev.type === 'punct') return !(prev.value === ')' || prev.value === ']' || prev.value === '}');
    if (prev.type === 'name') return BEFORE_EXPRESSION.has(prev.value);
    return false;
  }

  function tokenize(src) {
    const tokens = [];
    let i = 0;
    let nl = false;
    if (src.startsWith('#!')) while (i < src.length && !isNewline(src[i])) i++;
    while (i < src.length) {
      const c = src[i];
      if (isNewline(c)) { nl = true; i++; continue; }
      if (c === ' ' || c === '\t' || c === '\v' || c === '\f' || c === '\u00a0' || c === '\ufeff' || /\s/.test(c)) { i++; continue; }
      if (c === '/' && src[i + 1] === '/') { while (i < src.length && !isNewline(src[i])) i++; continue; }
      if (c === '/' && src[i + 1] === '*') {
        const e = src.indexOf('*/', i + 2);
        const stop = e < 0 ? src.length : e + 2;
        if (/[\n\r\u2028\u2029]/.test(src.slice(i, stop))) nl = true;
        i = stop;
        continue;
      }
      const start = i;
      let type;
      const prev = tokens[tokens.length - 1];
      if (c === '"' || c === "'") { type = 'string'; i = skipString(src, i); }
      else if (c === '`') { type = 'template'; i = skipTemplate(src, i); }
      else if (/[0-9]/.test(c) || (c === '.' && /[0-9]/.test(src[i + 1] || ''))) {
        type = 'number';
        i++;
        while (i < src.length && (/[0-9A-Za-z_.]/.test(src[i]) || ((src[i] === '+' || src[i] === '-') && /[eE]/.test(src[i - 1]) && !/^0[xX]/.test(src.slice(start, i))))) i++;
      } else if (ID_START.test(c) || c === '#') {
        type = 'name';
        i++;
        while (i < src.length && ID_PART.test(src[i])) i++;
      } else if (c === '/' && regexAllowed(prev)) {
        type = 'regex';
        i++;
        let inClass = false;
        while (i < src.length && !isNewline(src[i])) {
          const d = src[i];
          if (d === '\\') { i += 2; continue; }
          if (d === '[') inClass = true;
          else if (d === ']') inClass = false;
          else if (d === '/' && !inClass) break;
          i++;
        }
        i++;
        while (i < src.length && ID_PART.test(src[i])) i++;
      } else {
        type = 'punct';
        const p = PUNCTUATORS.find((q) => src.startsWith(q, i));
        i += p ? p.length : 1;
      }
      tokens.push({ type, value: src.slice(start, i), start, end: i, nl });
      nl = false;
    }
    return tokens;
  }

  // --- statements ------------------------------------------------------------------------

  const CONTINUES = new Set([
    '.', '?.', ',', '?', ':', '=', '==', '===', '!=', '!==', '<', '>', '<=', '>=', '+', '-',
    '*', '/', '%', '**', '&', '|', '^', '&&', '||', '??', '<<', '>>', '>>>', '+=', '-=', '*=',
    '/=', '%=', '**=', '&=', '|=', '^=', '<<=', '>>=', '>>>=', '&&=', '||=', '??=', '=>',
    ')', ']', '}', ';',
  ]);
  const CONTINUING_WORDS = new Set(['in', 'instanceof', 'of']);
  const AFTER_BLOCK = new Set(['else', 'catch', 'finally']);
  const HEADER_WORDS = new Set(['if', 'for', 'while', 'with', 'switch', 'catch']);
  const STATEMENT_WORDS = new Set([
    'var', 'let', 'const', 'class', 'function', 'if', 'for', 'while', 'do', 'switch', 'try',
    'throw', 'return', 'break', 'continue', 'with', 'import', 'export', 'debugger',
  ]);

  function endsExpression(t) {
    if (!t) return false;
    if (t.type === 'punct') return t.value === ')' || t.value === ']' || t.value === '}' || t.value === '++' || t.value === '--';
    if (t.type === 'name') return !BEFORE_EXPRESSION.has(t.value) || t.value === 'await' || t.value === 'yield';
    return true;
  }

  function continuesLine(t) {
    if (t.type === 'punct') return CONTINUES.has(t.value) || ((t.value === '(' || t.value === '[') && !t.nl);
    if (t.type === 'template') return !t.nl;
    if (t.type === 'name') return CONTINUING_WORDS.has(t.value);
    return false;
  }

  // Indices of the tokens that start a top-level statement (an approximation of the
  // grammar's statement boundaries, including automatic semicolon insertion).
  function statementStarts(tokens) {
    const starts = [];
    const stack = []; // open brackets: {token index, opener kind, header?}
    let expectBody = false; // after `if (...)`, `else`, `do`...: the next token continues
    let headerWord = null;
    let doPending = 0;
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      const prev = tokens[i - 1];
      if (stack.length === 0) {
        let start = false;
        if (i === 0) start = true;
        else if (expectBody) start = false;
        else if (prev.type === 'punct' && prev.value === ';') start = true;
        else if (prev.type === 'punct' && prev.value === '}' && prev.closedTop) {
          if (t.type === 'name' && AFTER_BLOCK.has(t.value)) start = false;
          else if (t.type === 'name' && t.value === 'while' && doPending > 0) start = false;
          else if (t.nl) start = !continuesLine(t);
          else start = prev.blockLike && !(t.type === 'punct' && CONTINUES.has(t.value));
        } else if (t.nl && endsExpression(prev) && !continuesLine(t)) start = true;
        else if (t.nl && prev.type === 'punct' && prev.value === '++') start = true;
        if (t.nl && t.type === 'punct' && (t.value === '++' || t.value === '--') && endsExpression(prev)) start = true;
        if (start) starts.push(i);
        expectBody = false;
        if (t.type === 'name') {
          if (t.value === 'while' && doPending > 0 && !start) { doPending--; headerWord = null; }
          else if (HEADER_WORDS.has(t.value)) headerWord = t.value;
          else if (t.value === 'else') expectBody = true;
          else if (t.value === 'do') { expectBody = true; doPending++; }
        }
      }
      if (t.type === 'punct') {
        if (t.value === '(' || t.value === '[' || t.value === '{') {
          let blockLike = false;
          if (t.value === '{' && stack.length === 0) {
            // A top-level brace that is a block, a function or class body (not an object
            // literal inside an expression).
            blockLike = !prev || (prev.type === 'punct' && (prev.value === ')' || prev.value === ';' || prev.value === '}' || prev.value === '=>')) ||
              (prev.type === 'name' && (prev.value === 'else' || prev.value === 'do' || prev.value === 'try' || prev.value === 'finally' || isClassHeader(tokens, i))) ||
              starts[starts.length - 1] === i;
          }
          stack.push({ value: t.value, header: stack.length === 0 && t.value === '(' && headerWord !== null && prev && prev.value === headerWord, blockLike });
          if (stack.length === 1 && t.value === '(' && headerWord !== null && prev && prev.value === headerWord) headerWord = null;
        } else if (t.value === ')' || t.value === ']' || t.value === '}') {
          const open = stack.pop();
          if (stack.length === 0 && open) {
            if (open.header) expectBody = true;
            if (t.value === '}') { t.closedTop = true; t.blockLike = open.blockLike; }
          }
        }
      }
    }
    return starts;
  }

  function isClassHeader(tokens, braceIndex) {
    // `class Name extends Base {`: look back for `class` before any `;`/`}` at this level.
    for (let j = braceIndex - 1; j >= 0 && braceIndex - j < 64; j--) {
      const t = tokens[j];
      if (t.type === 'name' && t.value === 'class') return true;
      if (t.type === 'punct' && (t.value === ';' || t.value === '}' || t.value === '{')) return false;
    }
    return false;
  }

  function statementKind(tokens, s, e) {
    const t = tokens[s];
    const next = tokens[s + 1];
    if (t.type === 'punct') return t.value === '{' ? 'block' : t.value === ';' ? 'empty' : 'expression';
    if (t.type !== 'name') return 'expression';
    if ((t.value === 'let') && next && (next.type === 'name' || next.value === '[' || next.value === '{') && !(next.type === 'name' && (next.value === 'in' || next.value === 'instanceof'))) return 'let';
    if (t.value === 'const' || t.value === 'var') return t.value;
    if (t.value === 'class' && next && next.type === 'name') return 'class';
    if (t.value === 'function') return 'function';
    if (t.value === 'async' && next && next.value === 'function' && !next.nl) return 'function';
    if (t.value === 'import' && next && !(next.value === '(' || next.value === '.')) return s + 1 <= e ? 'import' : 'expression';
    if (t.value === 'let') return 'expression';
    if (STATEMENT_WORDS.has(t.value)) return 'statement';
    if (next && next.value === ':' && s + 1 <= e) return 'statement'; // label
    return 'expression';
  }

  // --- binding names of a declaration pattern --------------------------------------------

  function skipInitializer(tokens, i, end) {
    let depth = 0;
    for (; i <= end; i++) {
      const v = tokens[i].type === 'punct' ? tokens[i].value : null;
      if (v === '(' || v === '[' || v === '{') depth++;
      else if (v === ')' || v === ']' || v === '}') { if (depth === 0) return i; depth--; }
      else if (v === ',' && depth === 0) return i;
    }
    return i;
  }

  function bindingNames(tokens, i, end, names) {
    const t = tokens[i];
    if (!t || i > end) return i;
    if (t.type === 'name') { names.push(t.value); return i + 1; }
    if (t.value === '[') {
      i++;
      while (i <= end && tokens[i].value !== ']') {
        if (tokens[i].value === ',') { i++; continue; }
        if (tokens[i].value === '...') i++;
        i = bindingNames(tokens, i, end, names);
        if (i <= end && tokens[i].value === '=') i = skipInitializer(tokens, i + 1, end);
      }
      return i + 1;
    }
    if (t.value === '{') {
      i++;
      while (i <= end && tokens[i].value !== '}') {
        const k = tokens[i];
        if (k.value === ',') { i++; continue; }
        if (k.value === '...') { i = bindingNames(tokens, i + 1, end, names); continue; }
        let key = null;
        if (k.value === '[') {
          let depth = 0;
          for (; i <= end; i++) {
            if (tokens[i].value === '[') depth++;
            else if (tokens[i].value === ']' && --depth === 0) break;
          }
          i++;
        } else {
          key = k;
          i++;
        }
        if (i <= end && tokens[i].value === ':') i = bindingNames(tokens, i + 1, end, names);
        else if (key && key.type === 'name') names.push(key.value);
        if (i <= end && tokens[i].value === '=') i = skipInitializer(tokens, i + 1, end);
      }
      return i + 1;
    }
    return i + 1;
  }

  // Splits the declarators of `let a = 1, {b} = c` (tokens s..e, after the keyword).
  function declarators(tokens, s, e) {
    const out = [];
    let depth = 0;
    let begin = s;
    let eq = -1;
    for (let i = s; i <= e + 1; i++) {
      const t = tokens[i];
      const v = t && i <= e && t.type === 'punct' ? t.value : null;
      if (i > e || (v === ',' && depth === 0)) {
        if (begin <= i - 1) out.push({ s: begin, e: i - 1, eq });
        begin = i + 1;
        eq = -1;
        continue;
      }
      if (v === '(' || v === '[' || v === '{') depth++;
      else if (v === ')' || v === ']' || v === '}') depth--;
      else if (v === '=' && depth === 0 && eq < 0) eq = i;
    }
    return out;
  }

  // --- cell transformation -----------------------------------------------------------------

  function countNewlines(s) {
    let n = 0;
    for (let i = 0; i < s.length; i++) if (s[i] === '\n') n++;
    return n;
  }

  // Rewrites `import(` into `__cubicleImport(` and static imports into dynamic ones (which
  // makes the cell asynchronous). Returns edits [{start, end, text}].
  function importEdits(src, tokens, starts, names) {
    const edits = [];
    for (let k = 0; k < starts.length; k++) {
      const s = starts[k];
      const e = (k + 1 < starts.length ? starts[k + 1] : tokens.length) - 1;
      if (statementKind(tokens, s, e) !== 'import') continue;
      let last = e;
      if (tokens[last].value === ';') last--;
      const fromIdx = (() => {
        for (let j = last; j > s; j--) if (tokens[j].type === 'name' && tokens[j].value === 'from') return j;
        return -1;
      })();
      const specTok = fromIdx >= 0 ? tokens[fromIdx + 1] : tokens[s + 1];
      if (!specTok || specTok.type !== 'string') continue;
      const spec = specTok.value;
      const parts = [];
      if (fromIdx >= 0) {
        let j = s + 1;
        while (j < fromIdx) {
          const c = tokens[j];
          if (c.value === ',') { j++; continue; }
          if (c.value === '*') { // * as ns
            const ns = tokens[j + 2];
            if (ns) { names.push(ns.value); parts.push(`${ns.value} = __m`); }
            j += 3;
            continue;
          }
          if (c.value === '{') {
            j++;
            const props = [];
            while (j < fromIdx && tokens[j].value !== '}') {
              if (tokens[j].value === ',') { j++; continue; }
              const imported = tokens[j].value;
              let local = imported;
              if (tokens[j + 1] && tokens[j + 1].value === 'as') { local = tokens[j + 2].value; j += 3; } else j++;
              names.push(local);
              props.push(`${local} = __m[${JSON.stringify(imported.replace(/^['"]|['"]$/g, ''))}]`);
            }
            j++;
            parts.push(...props);
            continue;
          }
          if (c.type === 'name') { // default import
            names.push(c.value);
            parts.push(`${c.value} = ('default' in __m ? __m.default : __m)`);
            j++;
            continue;
          }
          j++;
        }
      }
      const original = src.slice(tokens[s].start, tokens[e].end);
      let text = `;await (async () => { const __m = await __cubicleImport(${spec}); ${parts.map((p) => p + ';').join(' ')} })();`;
      text += '\n'.repeat(Math.max(0, countNewlines(original) - countNewlines(text)));
      edits.push({ start: tokens[s].start, end: tokens[e].end, text, statement: true });
    }
    return edits;
  }

  // `import(...)` -> `__cubicleImport(...)` (a vm script cannot import by itself).
  function rewriteDynamicImports(src, tokens) {
    const edits = [];
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i];
      const prev = tokens[i - 1];
      if (t.type === 'name' && t.value === 'import' && tokens[i + 1] && tokens[i + 1].value === '(' &&
          !(prev && (prev.value === '.' || prev.value === '?.'))) {
        edits.push({ start: t.start, end: t.end, text: '__cubicleImport' });
      }
    }
    return edits.length ? applyEdits(src, edits) : src;
  }

  function applyEdits(src, edits) {
    edits.sort((a, b) => a.start - b.start || a.end - b.end);
    let out = '';
    let pos = 0;
    for (const ed of edits) {
      if (ed.start < pos) continue; // overlapping (inside a rewritten statement)
      out += src.slice(pos, ed.start) + ed.text;
      pos = ed.end;
    }
    return out + src.slice(pos);
  }

  // The synchronous form: declarations made re-declarable and global.
  function transformSync(src, tokens, starts) {
    const edits = [];
    for (let k = 0; k < starts.length; k++) {
      const s = starts[k];
      const e = (k + 1 < starts.length ? starts[k + 1] : tokens.length) - 1;
      const kind = statementKind(tokens, s, e);
      if (kind === 'let' || kind === 'const') {
        edits.push({ start: tokens[s].start, end: tokens[s].end, text: 'var' });
      } else if (kind === 'class') {
        const name = tokens[s + 1].value;
        edits.push({ start: tokens[s].start, end: tokens[s].start, text: `var ${name} = ` });
        edits.push({ start: tokens[e].end, end: tokens[e].end, text: ';' });
      }
    }
    return applyEdits(src, edits);
  }

  // The asynchronous form: `var <names>; (async () => { <body> })()` on the first line
  // (line numbers of the cell are kept).
  function transformAsync(src, tokens, starts) {
    const names = [];
    const edits = importEdits(src, tokens, starts, names);
    const exports = [];
    let lastExpression = -1;
    for (let k = 0; k < starts.length; k++) {
      const s = starts[k];
      const e = (k + 1 < starts.length ? starts[k + 1] : tokens.length) - 1;
      const kind = statementKind(tokens, s, e);
      if (kind !== 'empty') lastExpression = kind === 'expression' ? s : -1;
      if (kind === 'let' || kind === 'const' || kind === 'var') {
        let last = e;
        if (tokens[last].value === ';') last--;
        const parts = [];
        for (const d of declarators(tokens, s + 1, last)) {
          const before = names.length;
          bindingNames(tokens, d.s, d.eq >= 0 ? d.eq - 1 : d.e, names);
          if (d.eq >= 0) parts.push(src.slice(tokens[d.s].start, tokens[d.e].end));
          else if (kind !== 'var') for (const n of names.slice(before)) parts.push(`${n} = undefined`);
        }
        const original = src.slice(tokens[s].start, tokens[e].end);
        let text = parts.length ? `;(${parts.join(', ')});` : ';';
        text += '\n'.repeat(Math.max(0, countNewlines(original) - countNewlines(text)));
        edits.push({ start: tokens[s].start, end: tokens[e].end, text });
      } else if (kind === 'class') {
        const name = tokens[s + 1].value;
        names.push(name);
        edits.push({ start: tokens[s].start, end: tokens[s].start, text: `;${name} = ` });
        edits.push({ start: tokens[e].end, end: tokens[e].end, text: ';' });
      } else if (kind === 'function') {
        const nameTok = tokens.slice(s, Math.min(e + 1, s + 4)).find((t, j) => j > 0 && t.type === 'name' && t.value !== 'function');
        if (nameTok) exports.push(`globalThis[${JSON.stringify(nameTok.value)}] = ${nameTok.value};`);
      }
    }
    if (lastExpression >= 0) {
      edits.push({ start: tokens[lastExpression].start, end: tokens[lastExpression].start, text: 'return ' });
    }
    const unique = [...new Set(names)].filter((n) => /^[A-Za-z_$][\w$]*$/.test(n));
    const head = (unique.length ? `var ${unique.join(', ')}; ` : '') + `(async () => { ${exports.join(' ')}`;
    return head + applyEdits(src, edits) + '\n})()';
  }

  // --- results and errors -------------------------------------------------------------------

  function stripQuotes(text) {
    if (text.length >= 2 && text[0] === text[text.length - 1] && (text[0] === "'" || text[0] === '"')) return text.slice(1, -1);
    return text;
  }

  function cleanStack(stack) {
    return String(stack)
      .split('\n')
      .filter((line) => !/^\s+at /.test(line) || /<cell-\d+>/.test(line) || !/(\[eval\]|\(node:|at node:|<anonymous>\)?$)/.test(line))
      .join('\n');
  }

  function describe(err) {
    if (err instanceof Error || (err && typeof err === 'object' && typeof err.stack === 'string' && typeof err.message === 'string')) {
      const name = err.name || (err.constructor && err.constructor.name) || 'Error';
      return { name: String(name), value: String(err.message), traceback: cleanStack(err.stack || `${name}: ${err.message}`) };
    }
    const text = typeof err === 'string' ? err : util.inspect(err);
    return { name: 'Error', value: text, traceback: `Uncaught ${text}` };
  }

  function emitError(err) {
    if (current === null || current.errored) return;
    current.errored = true;
    let info;
    if (err && err.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED') {
      info = { name: 'KeyboardInterrupt', value: String(err.message), traceback: 'KeyboardInterrupt: execution interrupted (SIGINT)' };
    } else {
      info = describe(err);
    }
    emit({ id: current.id, type: 'error', name: info.name, value: info.value, traceback: info.traceback });
  }

  function emitResult(value) {
    if (value === undefined || current === null) return;
    let text;
    try {
      text = util.inspect(value);
    } catch (e) {
      text = String(value);
    }
    emit({ id: current.id, type: 'result', is_main_result: true, text: stripQuotes(text), extra: {} });
  }

  // --- executions -----------------------------------------------------------------------------

  let executionCount = 0;
  let interruptCurrent = null; // rejects the awaited promise of an async cell on SIGINT

  process.on('SIGINT', () => {
    // Sync code is interrupted by breakOnSigint; this handles async cells (and is a no-op
    // while idle, where SIGINT is ignored).
    if (interruptCurrent !== null) interruptCurrent();
  });

  function compile(original, filename) {
    let code = original;
    let tokens = tokenize(code);
    const rewritten = rewriteDynamicImports(code, tokens);
    if (rewritten !== code) {
      code = rewritten;
      tokens = tokenize(code);
    }
    const starts = statementStarts(tokens);
    const hasImport = starts.some((i) => tokens[i].type === 'name' && tokens[i].value === 'import' && statementKind(tokens, i, tokens.length - 1) === 'import');
    const hasAwait = tokens.some((t) => t.type === 'name' && t.value === 'await');
    let firstError = null;
    if (!hasImport) {
      try {
        return { script: new vm.Script(transformSync(code, tokens, starts), { filename }), async: false };
      } catch (e) {
        firstError = e;
      }
    }
    if (hasAwait || hasImport) {
      try {
        return { script: new vm.Script(transformAsync(code, tokens, starts), { filename }), async: true };
      } catch (e) {
        firstError = firstError || e;
      }
    }
    // Report the error as the user's own code produces it (not our rewrite of it).
    try {
      new vm.Script(original, { filename });
    } catch (e) {
      throw e;
    }
    throw firstError;
  }

  function applyEnv(env) {
    const saved = new Map();
    if (!env || typeof env !== 'object') return saved;
    for (const [key, value] of Object.entries(env)) {
      if (!key || key.includes('=') || key.includes('\0')) continue;
      if (!saved.has(key)) saved.set(key, Object.prototype.hasOwnProperty.call(process.env, key) ? process.env[key] : undefined);
      process.env[key] = value === null || value === undefined ? '' : String(value);
    }
    return saved;
  }

  function restoreEnv(saved) {
    for (const [key, value] of saved) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }

  async function execute(request) {
    const id = request.id;
    executionCount += 1;
    const count = executionCount;
    const saved = applyEnv(request.env);
    current = { id, errored: false };
    try {
      const code = typeof request.code === 'string' ? request.code : '';
      let compiled = null;
      try {
        compiled = code.trim() ? compile(code, `<cell-${count}>`) : null;
      } catch (e) {
        emitError(e);
      }
      if (compiled !== null) {
        let value = compiled.script.runInThisContext({ breakOnSigint: true, displayErrors: true });
        if (compiled.async) {
          value = await new Promise((resolve, reject) => {
            interruptCurrent = () => {
              const err = new Error('Script execution was interrupted by `SIGINT`');
              err.code = 'ERR_SCRIPT_EXECUTION_INTERRUPTED';
              reject(err);
            };
            Promise.resolve(value).then(resolve, reject);
          }).finally(() => { interruptCurrent = null; });
        }
        emitResult(value);
      }
    } catch (e) {
      emitError(e);
    } finally {
      interruptCurrent = null;
      restoreEnv(saved);
      current = null;
      emit({ id, type: 'number_of_executions', execution_count: count });
      emit({ id, type: 'end_of_execution' });
    }
  }

  // --- request loop ----------------------------------------------------------------------------

  const queue = [];
  let busy = false;
  let closed = false;

  async function drainQueue() {
    if (busy) return;
    busy = true;
    try {
      while (queue.length) {
        const line = queue.shift();
        let request;
        try {
          request = JSON.parse(line);
          if (request === null || typeof request !== 'object' || Array.isArray(request)) throw new Error('a request must be a JSON object');
        } catch (e) {
          emit({ type: 'protocol_error', id: null, message: `bad request: ${e.message}` });
          continue;
        }
        if (request.op === 'execute') await execute(request);
        else emit({ type: 'protocol_error', id: request.id === undefined ? null : request.id, message: `unknown op ${JSON.stringify(request.op)}` });
      }
    } finally {
      busy = false;
    }
    if (closed) process.exit(0);
  }

  const net = require('net');
  const input = new net.Socket({ fd: requestFd, readable: true, writable: false });
  let pending = '';
  input.setEncoding('utf8');
  input.on('data', (chunk) => {
    pending += chunk;
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (line) queue.push(line);
    }
    drainQueue();
  });
  input.on('end', () => {
    closed = true;
    if (pending.trim()) queue.push(pending.trim());
    if (!busy) drainQueue();
  });
  input.on('error', () => {
    closed = true;
    if (!busy) process.exit(0);
  });
  // The request pipe must not keep the process alive by itself once closed; user timers
  // and servers may (as in any Node program) until the agent closes fd 0.

  emit({ type: 'ready', pid: process.pid, language: LANGUAGE });
})();
