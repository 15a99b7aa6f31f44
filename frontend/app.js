// Placeholder shell until the views land: lists the runs the backend serves.
export async function startApp(root) {
  const response = await fetch("runs");
  const {runs} = await response.json();
  const list = document.createElement("ul");
  for (const entry of runs) {
    const item = document.createElement("li");
    item.textContent = `${entry.run} (${entry.measures.join(", ")})`;
    list.append(item);
  }
  root.append(list);
}
