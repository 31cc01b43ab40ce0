// The PAC helper functions, as browsers define them (Netscape's original list, which Firefox
// and Chrome keep). Written here; dnsResolve and myIpAddress are the daemon's own (native).

function dnsDomainIs(host, domain) {
  host = String(host).toLowerCase();
  domain = String(domain).toLowerCase();
  return host.length >= domain.length &&
    host.substring(host.length - domain.length) === domain;
}

function isPlainHostName(host) {
  return String(host).indexOf('.') === -1 && String(host).indexOf(':') === -1;
}

function localHostOrDomainIs(host, hostdom) {
  host = String(host).toLowerCase();
  hostdom = String(hostdom).toLowerCase();
  return host === hostdom || hostdom.lastIndexOf(host + '.', 0) === 0;
}

function dnsDomainLevels(host) {
  var s = String(host);
  var n = 0;
  for (var i = 0; i < s.length; i++) {
    if (s.charAt(i) === '.') n++;
  }
  return n;
}

function shExpMatch(str, shexp) {
  var re = '^';
  shexp = String(shexp);
  for (var i = 0; i < shexp.length; i++) {
    var c = shexp.charAt(i);
    if (c === '*') re += '.*';
    else if (c === '?') re += '.';
    else if ('\\^$+.()|{}[]/'.indexOf(c) !== -1) re += '\\' + c;
    else re += c;
  }
  return new RegExp(re + '$').test(String(str));
}

function __ipv4(text) {
  var m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(String(text));
  if (!m) return null;
  var v = 0;
  for (var i = 1; i <= 4; i++) {
    var o = parseInt(m[i], 10);
    if (o > 255) return null;
    v = v * 256 + o;
  }
  return v;
}

function convert_addr(ipchars) {
  var v = __ipv4(ipchars);
  return v === null ? 0 : v;
}

function isResolvable(host) {
  return dnsResolve(host) !== null;
}

function isInNet(host, pattern, mask) {
  var ip = __ipv4(host);
  if (ip === null) {
    var resolved = dnsResolve(host);
    if (resolved === null) return false;
    ip = __ipv4(resolved);
    if (ip === null) return false;
  }
  var p = __ipv4(pattern);
  var m = __ipv4(mask);
  if (p === null || m === null) return false;
  // Bitwise operators are 32-bit signed: compare as unsigned.
  return ((ip & m) >>> 0) === ((p & m) >>> 0);
}

var __days = ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
var __months = ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];

function __gmt(args) {
  return args.length > 0 && args[args.length - 1] === 'GMT';
}

function weekdayRange(wd1, wd2, gmt) {
  var now = new Date();
  var day = __gmt(arguments) ? now.getUTCDay() : now.getDay();
  var a = __days.indexOf(String(wd1).toUpperCase());
  var b = (wd2 === undefined || wd2 === 'GMT') ? a : __days.indexOf(String(wd2).toUpperCase());
  if (a < 0 || b < 0) return false;
  return a <= b ? (day >= a && day <= b) : (day >= a || day <= b);
}

function timeRange() {
  var args = Array.prototype.slice.call(arguments);
  var gmt = __gmt(args);
  if (gmt) args.pop();
  var now = new Date();
  var h = gmt ? now.getUTCHours() : now.getHours();
  var m = gmt ? now.getUTCMinutes() : now.getMinutes();
  var s = gmt ? now.getUTCSeconds() : now.getSeconds();
  var t = h * 3600 + m * 60 + s;
  var n = args.map(function (x) { return parseInt(x, 10); });
  if (n.length === 1) return h === n[0];
  if (n.length === 2) return n[0] <= n[1] ? (h >= n[0] && h <= n[1]) : (h >= n[0] || h <= n[1]);
  var from, to;
  if (n.length === 4) { from = n[0] * 3600 + n[1] * 60; to = n[2] * 3600 + n[3] * 60 + 59; }
  else if (n.length === 6) { from = n[0] * 3600 + n[1] * 60 + n[2]; to = n[3] * 3600 + n[4] * 60 + n[5]; }
  else return false;
  return from <= to ? (t >= from && t <= to) : (t >= from || t <= to);
}

function dateRange() {
  var args = Array.prototype.slice.call(arguments);
  var gmt = __gmt(args);
  if (gmt) args.pop();
  var now = new Date();
  var d = gmt ? now.getUTCDate() : now.getDate();
  var mo = gmt ? now.getUTCMonth() : now.getMonth();
  var y = gmt ? now.getUTCFullYear() : now.getFullYear();
  // Each argument is a day (1-31), a month name or a year (four digits).
  function key(parts) {
    return (parts.y === undefined ? 0 : parts.y) * 10000 +
      (parts.m === undefined ? 0 : parts.m) * 100 + (parts.d === undefined ? 0 : parts.d);
  }
  function read(list) {
    var parts = {};
    list.forEach(function (x) {
      var month = __months.indexOf(String(x).toUpperCase());
      if (month >= 0) parts.m = month;
      else if (Number(x) > 31) parts.y = Number(x);
      else parts.d = Number(x);
    });
    return parts;
  }
  var half = args.length === 1 ? 1 : args.length / 2;
  if (half !== Math.floor(half)) return false;
  var a = read(args.slice(0, half));
  var b = args.length === 1 ? a : read(args.slice(half));
  var here = {
    y: a.y === undefined ? undefined : y,
    m: a.m === undefined ? undefined : mo,
    d: a.d === undefined ? undefined : d
  };
  var lo = key(a), hi = key(b), now_ = key(here);
  return lo <= hi ? (now_ >= lo && now_ <= hi) : (now_ >= lo || now_ <= hi);
}

function alert() {}
