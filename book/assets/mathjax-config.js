// MathJax 3 settings, read before assets/mathjax/tex-svg-full.js (bundled: nothing is fetched).
// Chapter pages: pymdownx.arithmatex has wrapped the math in .arithmatex spans, and only those are
// typeset. Notebook pages (mkdocs-jupyter): markdown cells keep $...$ and $$...$$, so those are.
(function () {
  var notebook = document.querySelector(".jupyter-wrapper") !== null;
  window.MathJax = notebook
    ? {
        tex: {
          inlineMath: [["$", "$"], ["\\(", "\\)"]],
          displayMath: [["$$", "$$"], ["\\[", "\\]"]],
          processEscapes: true,
          processEnvironments: true,
        },
        // the notebook, and its table of contents (a heading with math)
        startup: { elements: [".jupyter-wrapper", ".md-sidebar"] },
      }
    : {
        tex: {
          inlineMath: [["\\(", "\\)"]],
          displayMath: [["\\[", "\\]"]],
          processEscapes: true,
          processEnvironments: true,
        },
        // md-ellipsis: a heading with math, as the table of contents shows it
        options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex|md-ellipsis" },
      };
})();
