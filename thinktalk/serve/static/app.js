// thinktalk web page: a client of the Realtime socket (/v1/realtime), standard browser APIs only.
// Microphone: an AudioWorklet taps the device-rate stream; it is resampled to 24 kHz PCM16 and sent in 100 ms
// appends. Replies: PCM16 24 kHz deltas are scheduled back to back on a 24 kHz AudioContext.
"use strict";

const WIRE_RATE = 24000;
const APPEND_SAMPLES = WIRE_RATE / 10;
const VAD = { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 600 };
const TAP = `class Tap extends AudioWorkletProcessor {
  process(inputs) { const ch = inputs[0] && inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
}
registerProcessor("thinktalk-tap", Tap);`;

const $ = (id) => document.getElementById(id);
const page = {
  ws: null, reply: null, replyActive: false, attachments: [],
  mic: { ctx: null, stream: null, resampler: null, pending: [], pendingLength: 0, sending: false, captured: 0 },
  player: { ctx: null, next: 0, sources: new Set() },
  camera: null, cameraItems: [], frames: 0,
};
const CAMERA_FRAMES_KEPT = 2;  // older camera frames are deleted from the conversation (the prompt stays short)

function count(key) { document.body.dataset[key] = String(Number(document.body.dataset[key] || 0) + 1); }
function setStatus(text) { $("status").textContent = text; }

// ------------------------------------------------------------------------------------------------ the socket

const KEY_STORAGE = "thinktalk-api-key";  // sessionStorage: the key is kept for this tab only

// The server's --api-key, if it has one: the page's address (/#key=...), else what was typed in this tab.
function apiKey() {
  return new URLSearchParams(location.hash.slice(1)).get("key") || sessionStorage.getItem(KEY_STORAGE);
}

function authHeaders() { const key = apiKey(); return key ? { Authorization: `Bearer ${key}` } : {}; }

// Shows the served model (and whether its weights are the random demo), then connects, or first asks for the API
// key when the server wants one (the socket would be refused).
async function start() {
  const info = await (await fetch("/v1/realtime/voices")).json();
  const demo = info.random_weights ? " · random demo weights: its words and speech are noise" : "";
  $("model").textContent = info.model + demo;
  document.body.dataset.model = info.model;
  document.body.dataset.randomWeights = String(info.random_weights);
  const probe = await fetch("/v1/models", { headers: authHeaders() });
  if (probe.status === 401) {
    askForKey(apiKey() ? "That API key was refused; enter the server's --api-key" : "This server needs its API key");
    return;
  }
  connect();
}

function askForKey(message) {
  document.body.dataset.state = "key";
  setStatus(message);
  $("keyform").hidden = false;
  $("key").focus();
}

function submitKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key").value.trim());
  history.replaceState(null, "", location.pathname + location.search);  // a refused #key= must not win again
  $("keyform").hidden = true;
  start().catch(reportError);
}

function connect() {
  const url = new URL("/v1/realtime", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();  // browsers cannot set headers on a WebSocket: the key rides as a subprotocol, as OpenAI's
  const ws = new WebSocket(url, key ? ["realtime", `openai-insecure-api-key.${key}`] : ["realtime"]);
  page.ws = ws;
  ws.onopen = () => setStatus("connected");
  ws.onmessage = (message) => handle(JSON.parse(message.data));
  ws.onclose = () => {
    document.body.dataset.state = "closed";
    setStatus("disconnected — reload to reconnect");
  };
}

function send(event) {
  if (page.ws && page.ws.readyState === WebSocket.OPEN) page.ws.send(JSON.stringify(event));
}

function sessionSettings() {
  return {
    type: "realtime",
    output_modalities: [$("speak").checked ? "audio" : "text"],
    audio: {
      input: { turn_detection: $("mode").value === "vad" ? VAD : null },
      output: $("voice").value ? { voice: $("voice").value } : {},
    },
  };
}

function handle(event) {
  switch (event.type) {
    case "session.created":
      document.body.dataset.state = "ready";
      setStatus("ready");
      loadVoices(event.session.audio.output.voice)
        .then(() => send({ type: "session.update", session: sessionSettings() }))
        .catch(reportError);
      break;
    case "session.updated":
      document.body.dataset.session = event.session.id;
      break;
    case "input_audio_buffer.speech_started":
      $("vad").classList.add("speaking");
      $("vad-label").textContent = "hearing you…";
      count("speechStarted");
      stopPlayback();
      if (page.camera) sendFrame();
      break;
    case "input_audio_buffer.speech_stopped":
      $("vad").classList.remove("speaking");
      $("vad-label").textContent = "listening";
      count("speechStopped");
      break;
    case "conversation.item.deleted":
      document.querySelector(`[data-item="${CSS.escape(event.item_id)}"]`)?.remove();
      break;
    case "conversation.item.created":
      if (event.item.role === "user") showUserItem(event.item);
      break;
    case "response.created":
      page.replyActive = true;
      page.reply = addMessage("assistant streaming", "");
      break;
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta":
      if (page.reply) page.reply.textContent += event.delta;
      count("transcriptDeltas");
      scrollDown();
      break;
    case "response.output_audio.delta":
      count("audioChunks");
      play(event.delta);
      break;
    case "response.done":
      page.replyActive = false;
      if (page.reply) {
        page.reply.classList.remove("streaming");
        if (event.response.status === "cancelled") page.reply.classList.add("cancelled");
        if (!page.reply.textContent) page.reply.textContent = "…";
      }
      if (event.response.status === "cancelled") stopPlayback();
      page.reply = null;
      document.body.dataset.lastStatus = event.response.status;
      count("responsesDone");
      break;
    case "error":
      addMessage("error", `${event.error.message}${event.error.event_type ? ` (${event.error.event_type})` : ""}`);
      break;
    default:
      break;
  }
}

async function loadVoices(current) {
  const reply = await fetch("/v1/realtime/voices", { headers: authHeaders() });
  const { voices } = await reply.json();
  const select = $("voice");
  select.replaceChildren(...voices.map((name) => new Option(name, name, false, name === current)));
  select.disabled = voices.length === 0;
  if (voices.length === 0) $("speak").checked = false;
}

// --------------------------------------------------------------------------------------------- transcript

function addMessage(kind, text) {
  const element = document.createElement("div");
  element.className = `msg ${kind}`;
  element.textContent = text;
  $("log").append(element);
  scrollDown();
  return element;
}

function scrollDown() { $("log").scrollTop = $("log").scrollHeight; }

function showUserItem(item) {
  const element = addMessage("user", "");
  element.dataset.item = item.id;
  for (const part of item.content) {
    if (part.type === "input_text") element.append(document.createTextNode(part.text));
    if (part.type === "input_audio") {
      const tag = document.createElement("div");
      tag.className = "tag";
      tag.textContent = "♪ audio";
      element.append(tag);
    }
    if (part.type === "input_image" && part.image_url) {
      const image = document.createElement("img");
      image.src = part.image_url;
      image.alt = "image";
      element.append(image);
    }
  }
}

// ----------------------------------------------------------------------------------------------- playback

function playerContext() {
  const player = page.player;
  if (!player.ctx) player.ctx = new AudioContext({ sampleRate: WIRE_RATE });
  if (player.ctx.state === "suspended") player.ctx.resume().catch(reportError);
  return player.ctx;
}

function pcm16ToFloat(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

function floatToPcm16(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(2 * i, s < 0 ? s * 32768 : s * 32767, true);
  }
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function play(base64) {
  const samples = pcm16ToFloat(base64);
  if (samples.length === 0) return;
  const ctx = playerContext();
  const buffer = ctx.createBuffer(1, samples.length, WIRE_RATE);
  buffer.copyToChannel(samples, 0);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  const at = Math.max(ctx.currentTime + 0.03, page.player.next);
  source.start(at);
  page.player.next = at + buffer.duration;
  page.player.sources.add(source);
  source.onended = () => page.player.sources.delete(source);
  document.body.dataset.audioContext = ctx.state;
  count("audioPlayed");
}

function stopPlayback() {
  for (const source of page.player.sources) source.stop();
  page.player.sources.clear();
  page.player.next = 0;
}

// ------------------------------------------------------------------------------------------------ microphone

class Resampler {  // streaming linear interpolation from the device rate to 24 kHz
  constructor(from, to) { this.step = from / to; this.position = 0; this.previous = 0; }

  push(input) {
    const out = [];
    let position = this.position;  // index into [previous, ...input]
    while (position < input.length) {
      const i = Math.floor(position);
      const fraction = position - i;
      const a = i === 0 ? this.previous : input[i - 1];
      const b = input[i];
      out.push(a + (b - a) * fraction);
      position += this.step;
    }
    this.position = position - input.length;
    this.previous = input[input.length - 1];
    return Float32Array.from(out);
  }
}

async function startMic() {
  const mic = page.mic;
  if (mic.ctx) return;
  mic.stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  mic.ctx = new AudioContext();
  if (mic.ctx.state === "suspended") mic.ctx.resume().catch(reportError);  // never awaited: may wait for a device
  const module = URL.createObjectURL(new Blob([TAP], { type: "text/javascript" }));
  await mic.ctx.audioWorklet.addModule(module);
  const tap = new AudioWorkletNode(mic.ctx, "thinktalk-tap");
  const mute = mic.ctx.createGain();
  mute.gain.value = 0;
  mic.ctx.createMediaStreamSource(mic.stream).connect(tap);
  tap.connect(mute).connect(mic.ctx.destination);  // keeps the tap pulled in every browser
  mic.resampler = new Resampler(mic.ctx.sampleRate, WIRE_RATE);
  tap.port.onmessage = (message) => onMicFrame(message.data);
  $("vad-label").textContent = "mic on";
}

function onMicFrame(frame) {
  const mic = page.mic;
  let energy = 0;
  for (const s of frame) energy += s * s;
  $("level").style.width = `${Math.min(100, Math.sqrt(energy / frame.length) * 400)}%`;
  if (!mic.sending) return;
  const samples = mic.resampler.push(frame);
  mic.pending.push(samples);
  mic.pendingLength += samples.length;
  if (mic.pendingLength >= APPEND_SAMPLES) flushMic();
}

function flushMic() {
  const mic = page.mic;
  if (mic.pendingLength === 0) return;
  const all = new Float32Array(mic.pendingLength);
  let offset = 0;
  for (const part of mic.pending) { all.set(part, offset); offset += part.length; }
  mic.pending = [];
  mic.pendingLength = 0;
  mic.captured += all.length;
  send({ type: "input_audio_buffer.append", audio: floatToPcm16(all) });
}

async function pressTalk() {
  playerContext();
  if ($("mode").value === "vad") return toggleHandsFree();
  await startMic();
  if (page.mic.sending) return;
  stopPlayback();
  if (page.replyActive) send({ type: "response.cancel" });
  send({ type: "input_audio_buffer.clear" });
  if (page.camera) sendFrame();
  page.mic.captured = 0;
  page.mic.sending = true;
  $("talk").classList.add("active");
}

function releaseTalk() {
  if ($("mode").value === "vad" || !page.mic.sending) return;
  flushMic();
  page.mic.sending = false;
  $("talk").classList.remove("active");
  if (page.mic.captured < APPEND_SAMPLES) {  // the server needs 100 ms; a tap of the button records nothing
    addMessage("note", page.mic.ctx.state === "running" ? "Hold the button while you speak."
      : `No sound from the microphone (audio is ${page.mic.ctx.state}).`);
    send({ type: "input_audio_buffer.clear" });
    return;
  }
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
}

async function toggleHandsFree() {
  await startMic();
  page.mic.sending = !page.mic.sending;
  $("talk").classList.toggle("active", page.mic.sending);
  $("talk").textContent = page.mic.sending ? "Stop listening" : "Start listening";
  $("vad-label").textContent = page.mic.sending ? "listening" : "mic paused";
}

function onModeChange() {
  const vad = $("mode").value === "vad";
  document.body.dataset.mode = vad ? "vad" : "ptt";
  page.mic.sending = false;
  $("talk").classList.remove("active");
  $("talk").textContent = vad ? "Start listening" : "Hold to talk";
  send({ type: "input_audio_buffer.clear" });
  send({ type: "session.update", session: sessionSettings() });
}

// ---------------------------------------------------------------------------------------------------- camera

async function toggleCamera() {
  if (!$("camera").checked) {
    if (page.camera) page.camera.getTracks().forEach((track) => track.stop());
    page.camera = null;
    $("preview").hidden = true;
    return;
  }
  page.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  $("preview").srcObject = page.camera;
  $("preview").hidden = false;
}

function cameraFrame() {
  const video = $("preview");
  if (!page.camera || video.videoWidth === 0) return null;
  const scale = Math.min(1, 448 / video.videoWidth);
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.8);
}

function sendFrame() {
  const frame = cameraFrame();
  if (!frame) return;
  page.frames += 1;
  const id = `camera_${Date.now()}_${page.frames}`;
  send({ type: "conversation.item.create", item: { id, type: "message", role: "user",
    content: [{ type: "input_image", image_url: frame }] } });
  page.cameraItems.push(id);
  while (page.cameraItems.length > CAMERA_FRAMES_KEPT) {
    send({ type: "conversation.item.delete", item_id: page.cameraItems.shift() });
  }
}

// -------------------------------------------------------------------------------------------- text and files

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function audioFileToPcm16(file) {
  const decoder = new AudioContext();
  const decoded = await decoder.decodeAudioData(await file.arrayBuffer());
  await decoder.close();
  const length = Math.max(1, Math.ceil(decoded.duration * WIRE_RATE));
  const offline = new OfflineAudioContext(1, length, WIRE_RATE);  // mixes to mono and resamples
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const rendered = await offline.startRendering();
  return floatToPcm16(rendered.getChannelData(0));
}

async function filePart(file) {
  if (file.type.startsWith("image/")) return { type: "input_image", image_url: await readAsDataUrl(file) };
  if (file.type.startsWith("audio/")) return { type: "input_audio", audio: await audioFileToPcm16(file) };
  throw new Error(`${file.name}: only images and audio can be attached`);
}

async function sendChat(submit) {
  submit.preventDefault();
  playerContext();  // created while the click still counts as a user gesture, so the reply's audio may start
  const text = $("text").value.trim();
  const files = [...$("files").files];
  if (!text && files.length === 0) return;
  const content = [];
  try {
    for (const file of files) content.push(await filePart(file));
  } catch (error) {
    addMessage("error", String(error.message || error));
    return;
  }
  const frame = cameraFrame();
  if (frame) content.push({ type: "input_image", image_url: frame });
  if (text) content.push({ type: "input_text", text });
  $("text").value = "";
  $("files").value = "";
  $("attached").textContent = "";
  stopPlayback();
  if (page.replyActive) send({ type: "response.cancel" });
  send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
  send({ type: "response.create" });
}

function reportError(error) { addMessage("error", String((error && error.message) || error)); }

function init() {
  $("chat").addEventListener("submit", (event) => sendChat(event).catch(reportError));
  $("files").addEventListener("change", () => {
    $("attached").textContent = [...$("files").files].map((file) => file.name).join(", ");
  });
  $("talk").addEventListener("pointerdown", () => pressTalk().catch(reportError));
  $("talk").addEventListener("pointerup", releaseTalk);
  $("talk").addEventListener("pointerleave", releaseTalk);
  document.addEventListener("keydown", (event) => {
    if (event.code === "Space" && event.target === document.body && !event.repeat) {
      event.preventDefault();
      pressTalk().catch(reportError);
    }
  });
  document.addEventListener("keyup", (event) => {
    if (event.code === "Space" && event.target === document.body) releaseTalk();
  });
  $("mode").addEventListener("change", onModeChange);
  $("voice").addEventListener("change", () => send({ type: "session.update", session: sessionSettings() }));
  $("speak").addEventListener("change", () => send({ type: "session.update", session: sessionSettings() }));
  $("camera").addEventListener("change", () => toggleCamera().catch((error) => {
    $("camera").checked = false;
    reportError(error);
  }));
  $("keyform").addEventListener("submit", submitKey);
  document.body.dataset.mode = "ptt";
  start().catch(reportError);
}

init();
