// The page's script: Uppy (@uppy/core + @uppy/tus) uploading straight to chunksvc with an upload
// token the backend minted. Bundled for the browser with esbuild (see docs/browser.md).
import Uppy from "@uppy/core";
import Tus from "@uppy/tus";

const status = document.querySelector("#status");
const progress = document.querySelector("#progress");
const uppy = new Uppy({ autoProceed: false }).use(Tus, { chunkSize: 256 * 1024, retryDelays: [0, 500, 1000] });

// One chunksvc session per file, asked of the backend once and remembered across reloads, so
// picking the same file again resumes it (tus HEAD, then PATCH from the offset the service holds).
async function sessionFor(file) {
  const key = `chunksvc:${file.name}:${file.size}:${file.lastModified}`;
  const saved = JSON.parse(localStorage.getItem(key) || "null");
  if (saved && Date.parse(saved.expires_at) > Date.now()) return saved;
  const response = await fetch("/start", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ filename: file.name, size: file.size, content_type: file.type || null }),
  });
  if (!response.ok) throw new Error(`the backend said ${response.status}`);
  const started = await response.json();
  localStorage.setItem(key, JSON.stringify(started));
  return started;
}

document.querySelector("#file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const session = await sessionFor(file);
  const id = uppy.addFile({ name: file.name, type: file.type, data: file });
  // The token instead of an API key; uploadUrl: the session exists, so tus resumes it, never creates.
  uppy.setFileState(id, { tus: { uploadUrl: session.upload_url, headers: { Authorization: `Bearer ${session.token}` } } });
  progress.max = file.size;
  status.textContent = `uploading ${file.name} (session ${session.session_id})`;
  uppy.upload();
});

uppy.on("upload-progress", (file, { bytesUploaded }) => { progress.value = bytesUploaded; });
uppy.on("upload-error", (file, error) => { status.textContent = `failed: ${error.message}`; });
uppy.on("complete", ({ successful }) => {
  if (!successful.length) return;
  status.textContent = `upload complete: ${successful[0].name}`;
  status.className = "done";
});
