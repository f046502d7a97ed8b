// Runs page.js in a real Chromium and prints what it found as one JSON line on stdout.
//
//   node drive.mjs '{"chromium": "/usr/bin/chromium", "userDataDir": "...", "netLog": "...",
//                    "resolverRules": "...", "probe": {"bootstrap": "...", "peerId": "...",
//                    "peerB36": "...", "zone": "libp2p.direct"}}'
//
// The page is bundled with esbuild and served from 127.0.0.1 (a loopback page may open
// connections to loopback; Chromium's local-network rules would stop a public one). Chromium
// is driven over CDP by playwright-core, with the profile directory the caller made (fresh
// per run: no TLS session to resume, no cached state) and HOME from the caller, whose
// ~/.pki/nssdb trusts the test CA. Diagnostics go to stderr; the exit code is 0 when the
// browser ran, whatever the probe found (the JSON says), and 1 when it could not.
import { build } from 'esbuild'
import { createServer } from 'node:http'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const here = dirname(fileURLToPath(import.meta.url))
const config = JSON.parse(process.argv[2])
const started = performance.now()
const say = (line) => process.stderr.write(`[drive ${((performance.now() - started) / 1000).toFixed(2)}s] ${line}\n`)

const bundle = await build({
  entryPoints: [join(here, 'page.js')],
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2022',
  write: false,
  logLevel: 'warning'
})
const script = bundle.outputFiles[0].contents
say(`bundled page.js (${script.length} bytes)`)

const html = '<!doctype html><meta charset="utf-8"><title>autotls browser test</title>' +
  '<script type="module" src="/page.js"></script>'
const server = createServer((req, res) => {
  if (req.url === '/page.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' }).end(script)
  } else if (req.url === '/') {
    res.writeHead(200, { 'content-type': 'text/html' }).end(html)
  } else {
    res.writeHead(204).end() // /favicon.ico: nothing, and no 404 in the page's console
  }
})
await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
const origin = `http://127.0.0.1:${server.address().port}`

const args = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  `--host-resolver-rules=${config.resolverRules}`
]
if (config.netLog) args.push(`--log-net-log=${config.netLog}`, '--net-log-capture-mode=Default')

let context
let code = 0
try {
  context = await chromium.launchPersistentContext(config.userDataDir, {
    executablePath: config.chromium,
    headless: true,
    args,
    timeout: 30_000
  })
  say(`chromium ${context.browser()?.version() ?? ''} started`)
  const page = context.pages()[0] ?? await context.newPage()
  page.on('console', message => say(`page: ${message.text()}`))
  page.on('pageerror', error => say(`page error: ${error.message}`))
  await page.goto(`${origin}/`)
  await page.waitForFunction(() => window.probeReady === true, null, { timeout: 15_000 })
  const result = await page.evaluate(probe => window.probe(probe), config.probe)
  say(`probe done: ${result.ok ? 'ok' : result.error}`)
  process.stdout.write(JSON.stringify(result) + '\n')
} catch (error) {
  say(`failed: ${error.stack ?? error}`)
  code = 1
} finally {
  await context?.close() // writes the net log
  server.close()
}
process.exit(code)
