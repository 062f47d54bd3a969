// klstore report: draws the page's figures (plotly.js, from assets/) and enlarges them on click.
// The figures come from the JSON element #klstore-figures; every text in them was escaped when
// the site was built, and this script only ever puts strings into the page as text.
(function () {
  'use strict';
  var root = document.body.getAttribute('data-root') || '';
  var figures = JSON.parse(document.getElementById('klstore-figures').textContent || '{}');
  var config = {displayModeBar: false, responsive: true};
  var zoom = document.getElementById('zoom');

  function plot(div, id, height) {
    var fig = figures[id];
    var layout = Object.assign({}, fig.layout, height ? {height: height} : {});
    div.textContent = '';
    return Plotly.newPlot(div, fig.data, layout, config).then(function (gd) {
      div.setAttribute('data-drawn', id);
      return gd;
    });
  }

  function hasLinks(id) {
    return figures[id].links.some(function (row) { return row.some(Boolean); });
  }

  function enlarge(id) {
    var panel = zoom.querySelector('.panel');
    var div = zoom.querySelector('.plot');
    zoom.hidden = false;
    zoom.setAttribute('data-fig', id);
    zoom.querySelector('.hint').textContent = hasLinks(id)
      ? 'Click a cell to open the map of the prompt with its largest value. Esc closes.' : 'Esc closes.';
    plot(div, id, Math.max(figures[id].layout.height, panel.clientHeight - 60)).then(function (gd) {
      gd.on('plotly_click', function (event) {
        var point = event.points && event.points[0];
        if (!point || point.curveNumber !== 0) return;
        var row = figures[id].links[point.y];  // line figures have no links
        var link = row && row[point.x];
        if (link) window.location.href = root + link;
      });
    });
  }

  function shrink() {
    var div = zoom.querySelector('.plot');
    if (window.Plotly && div.getAttribute('data-drawn')) Plotly.purge(div);
    div.removeAttribute('data-drawn');
    zoom.hidden = true;
    zoom.removeAttribute('data-fig');
  }

  zoom.querySelector('.close').addEventListener('click', shrink);
  zoom.addEventListener('click', function (event) { if (event.target === zoom) shrink(); });
  document.addEventListener('keydown', function (event) { if (event.key === 'Escape' && !zoom.hidden) shrink(); });

  var cards = document.querySelectorAll('[data-fig]');
  var lazy = 'IntersectionObserver' in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      if (!entry.isIntersecting) return;
      lazy.unobserve(entry.target);
      plot(entry.target.querySelector('.plot'), entry.target.getAttribute('data-fig'));
    });
  }, {rootMargin: '300px'}) : null;
  Array.prototype.forEach.call(cards, function (card) {
    var id = card.getAttribute('data-fig');
    if (!figures[id] || card === zoom) return;
    card.querySelector('.plot').addEventListener('click', function () { enlarge(id); });
    if (lazy) lazy.observe(card); else plot(card.querySelector('.plot'), id);
  });
})();
