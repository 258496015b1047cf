// The page of `export.py --format web`: a photo from the camera or the phone's files, described in this
// browser by captioner.js (its text read, what is wrong with it, the thing in it, the caption), announced in the
// live region and read aloud on request. The photo is never sent.
import { loadCaptioner, UnreadableImage } from "./captioner.js";

const input = document.getElementById("photo"), answer = document.getElementById("answer");
const speak = document.getElementById("speak"), shown = document.getElementById("shown");
const state = document.getElementById("state");
let said = "", chosen = 0, queue = Promise.resolve();
if (!("speechSynthesis" in window)) { speak.hidden = true; }
function say(text) { answer.textContent = text; }

if ("serviceWorker" in navigator) {  // keeps every file of this folder, so that the page works offline
  navigator.serviceWorker.register("sw.js").catch(() => {});
}
const ready = loadCaptioner("./").then((captioner) => {
  // how long the page took from opening to ready, for the benchmark
  document.documentElement.dataset.readyMs = performance.now().toFixed(0);
  state.textContent = "Ready. It works without a connection from now on.";
  // the text reader's models load now, in the background: the page is usable at once, and a photo chosen
  // before they are in waits for them
  captioner.loadReader().then((reader) => {
    document.documentElement.dataset.readerMs = performance.now().toFixed(0);
    if (!reader && captioner.readerError) state.textContent = "Ready, but text in photos cannot be read here.";
  });
  return captioner;
});
ready.catch((e) => {
  state.textContent = "The describer could not load.";
  say("Sorry, the describer could not load in this browser (" + e.message + ").");
});

input.addEventListener("change", async () => {
  const [file] = input.files, start = performance.now(), mine = ++chosen;
  if (!file) return;
  said = "";  // until this photo's description: nothing to read aloud
  Object.assign(speak, { disabled: true });
  say("Describing the photo\u2026");
  // one photo at a time through the model; a photo chosen while another is described replaces it
  const work = queue.then(async () => {
    if (mine !== chosen) return null;
    const captioner = await ready;
    // let the announcement out before the work starts: the next frame is drawn (the live region's change goes to
    // the screen reader with it), then the work; a hidden page draws no frames, so at most 100 ms
    await new Promise((done) => { requestAnimationFrame(() => setTimeout(done, 0)); setTimeout(done, 100); });
    return captioner.describe(file);
  });
  queue = work.catch(() => {});
  let result;
  try {
    result = await work;
  } catch (e) {
    if (mine === chosen) {
      say(e instanceof UnreadableImage ? "Sorry, no description: " + e.message + "."
          : "Sorry, the photo could not be described (" + e.message + ").");
    }
    return;
  }
  if (mine !== chosen) return;
  // what the tests and the benchmark read
  const stats = { caption: result.caption, level: result.confidence_level || "", ms: JSON.stringify(result.ms),
                  confidence: result.confidence ?? "", result: JSON.stringify(result) };
  Object.assign(answer.dataset, stats);
  document.documentElement.dataset.captionMs = (performance.now() - start).toFixed(0);
  show(file, result.description || result.alt_text || result.caption);
});

function show(file, text) {
  // the description announced, the photo shown below it, and Read aloud ready to say it; the photo's alt text
  // does not say the description again, which a screen reader has just read out
  said = text;
  URL.revokeObjectURL(shown.src);
  Object.assign(shown, { src: URL.createObjectURL(file), alt: "The photo described above", hidden: false });
  say(text);
  speak.disabled = false;
}

// Read aloud: a second press starts over rather than queueing another reading
speak.addEventListener("click", () => {
  if (said) {
    speechSynthesis.cancel();
    speechSynthesis.speak(new SpeechSynthesisUtterance(said));
  }
});
