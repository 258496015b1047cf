const input = document.getElementById("photo"), answer = document.getElementById("answer");
const speak = document.getElementById("speak"), shown = document.getElementById("shown");
const token = document.getElementById("token");
let said = "";
if (token) {  // a link ending in #token=... fills it once; this browser then remembers it
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) { localStorage.setItem("caption-token", fromLink); history.replaceState(null, "", location.pathname); }
  token.value = localStorage.getItem("caption-token") || "";
}
if (!("speechSynthesis" in window)) { speak.hidden = true; }
function say(text) { answer.textContent = text; }
input.addEventListener("change", async () => {
  const file = input.files[0];
  if (!file) return;
  speak.disabled = true;
  said = "";
  say("Describing the photo\u2026");
  const form = new FormData();
  form.append("image", file);
  const headers = {};
  if (token && token.value) {
    headers.Authorization = "Bearer " + token.value;
    localStorage.setItem("caption-token", token.value);
  }
  let response, body;
  try {
    response = await fetch("caption", { method: "POST", body: form, headers });
    body = await response.json();
  } catch (e) {
    say("Sorry, the service could not be reached. Check the connection and try again.");
    return;
  }
  if (!response.ok) { say("Sorry, no description: " + (body.error || response.statusText)); return; }
  said = body.description || body.alt_text || body.caption;
  if (shown.src) URL.revokeObjectURL(shown.src);
  shown.src = URL.createObjectURL(file);
  shown.alt = said;
  shown.hidden = false;
  say(said);
  speak.disabled = false;
});
speak.addEventListener("click", () => {
  if (!said) return;
  speechSynthesis.cancel();  // a second press starts over rather than queueing another reading
  speechSynthesis.speak(new SpeechSynthesisUtterance(said));
});
